"""SegmentedPrefixAttention: SharedPrefixAttention for the candidates of several users in one call.

Inputs: ``q [C,H,T,dh]``; ``k_prefix``/``v_prefix [U,H,L,dh]``, U users' K/V packed along the
batch axis, user ``u`` at offset ``u`` and left-padded to the batch's longest history L;
``prefix_valid [U]`` int64 (user u's real tokens at the right end of its row; >= L means
all); ``cand_user [C]`` int64 (candidate c belongs to user ``cand_user[c]``, in ``[0, U)``;
candidates sorted by user run fastest on the Triton kernel, any order is exact);
``k_own``/``v_own [C,H,T,dh]``. Output ``[C,H,T,dh]``: candidate c's NS-tokens attend its
own user's real prefix plus its own tokens causally, exactly SharedPrefixAttention with
that user's K/V. With U = 1 and ``cand_user`` all 0 it is SharedPrefixAttention.
Attribute ``scale``.
"""

OP = "SegmentedPrefixAttention"
INPUTS = ["q", "k_prefix", "v_prefix", "prefix_valid", "cand_user", "k_own", "v_own"]
OUTPUTS = ["out"]
PLUGIN_ATTRIBUTES = ["scale"]  # the TensorRT plugin's, in registration order
