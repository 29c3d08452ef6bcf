"""TailCausalAttention: the newest Lq of Lk S-tokens attend the real keys, causally (bottom-right)
or bidirectionally.

Inputs: ``q [B,H,Lq,dh]``, ``k``/``v [B,H,Lk,dh]`` (left-padded), ``valid [B]`` int64
(real tokens at the right end; >= Lk means all; <= 0 none). Query i sits at key position
``Lk - Lq + i``. Output ``[B,H,Lq,dh]``.

Attributes: ``scale`` (float, the softmax scale) and ``causal`` (int, default 1):

- ``causal=1``: query i sees the real keys at or before its position (bottom-right causal,
  :func:`onetrans_trt.models.attention.tail_causal_attention`);
- ``causal=0``: query i sees every real key (full self-attention over the real tail,
  :func:`onetrans_trt.models.attention.bidirectional_attention`).

A padding query (its position left of the real tail) sees itself, so no row is empty: only
itself with ``causal=1``; itself and every real key with ``causal=0`` (the model's
``bidirectional_mask`` is ``real | itself``; its docstring's "sees only itself" holds for the
causal mask alone). Padding rows are exact either way, so a fused node equals the graph it
replaced. Nodes written before ``causal`` existed carry none: the ONNX function defaults it to 1;
TensorRT does not (see ``trt_plugin.py``), so fuse-attention always writes it.
"""

OP = "TailCausalAttention"
INPUTS = ["q", "k", "v", "valid"]
OUTPUTS = ["out"]
PLUGIN_ATTRIBUTES = ["scale", "causal"]  # the TensorRT plugin's, in registration order
