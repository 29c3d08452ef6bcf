"""SharedDecodeAttention: C candidates' queries decode one shared K/V (HyFormer's query
decoding), with no part of their own.

Inputs: ``q [C,H,N,dh]`` (N queries per candidate), ``k``/``v [1,H,n,dh]`` (one user's K/V
of one sequence, left-padded; n may be 0), ``valid [1]`` int64 (the real keys are the last
``min(valid, n)``: >= n all, <= 0 none). Output ``[C,H,N,dh]``: ``softmax(scale * q k^T)``
over the real keys only, times ``v``; a row with no real key (valid 0, or n == 0) is exactly
0, never NaN. Every candidate's queries read the same K/V: it is never copied per candidate.
Attribute ``scale`` (softmax scale, the model's ``1/sqrt(dh)``).
"""

OP = "SharedDecodeAttention"
INPUTS = ["q", "k", "v", "valid"]
OUTPUTS = ["out"]
PLUGIN_ATTRIBUTES = ["scale"]  # the TensorRT plugin's, in registration order
