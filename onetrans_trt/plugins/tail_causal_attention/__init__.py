"""TailCausalAttention: the newest Lq of Lk S-tokens attend causally (bottom-right).

Inputs: ``q [B,H,Lq,dh]``, ``k``/``v [B,H,Lk,dh]`` (left-padded), ``valid [B]`` int64
(real tokens at the right end; >= Lk means all). Query i sits at key position
``Lk - Lq + i``; it sees real keys at or before it; a padding query sees only itself.
Output ``[B,H,Lq,dh]``. Attribute ``scale``.
"""

OP = "TailCausalAttention"
INPUTS = ["q", "k", "v", "valid"]
OUTPUTS = ["out"]
