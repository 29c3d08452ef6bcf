"""SharedPrefixAttention: C candidates' NS queries over one user's K/V plus their own.

Inputs: ``q [C,H,T,dh]``, ``k_prefix``/``v_prefix [1,H,L,dh]`` (left-padded),
``prefix_valid [1]`` int64 (real tokens at the right end; >= L means all), ``k_own``/
``v_own [C,H,T,dh]`` (NS-token i sees own tokens <= i). Output ``[C,H,T,dh]``.
Attribute ``scale`` (softmax scale, default ``1/sqrt(dh)``).
"""

OP = "SharedPrefixAttention"
INPUTS = ["q", "k_prefix", "v_prefix", "prefix_valid", "k_own", "v_own"]
OUTPUTS = ["out"]
PLUGIN_ATTRIBUTES = ["scale"]  # the TensorRT plugin's, in registration order
