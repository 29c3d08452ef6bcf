"""TailCausalAttention as one flash-style Triton kernel.

One program per (block of BLOCK_M queries, user x head). Query row r sits at key position
``Lk - Lq + r``; keys are streamed in tiles of BLOCK_N from the first key any row of the
block can see to the last position of the block (keys after it are never seen; with
``CAUSAL=0`` to the last key, and the causal condition is dropped), with an online softmax
in fp32. Keys in the left padding are skipped; a padding query sees itself (with
``CAUSAL=0`` also every real key, as the reference's ``real | itself`` mask). ``CAUSAL`` is a
constexpr: the two modes are two compiled kernels, selected by the node's ``causal``.
"""

from __future__ import annotations

import math

import triton.language as tl  # this module needs the 'kernels' extra; import it only then

from onetrans_trt.plugins._triton import compile_aot, dtype_code, head_pad, interpreted, require_interpreter

BLOCK_M = 16
BLOCK_N = 16


def tail_causal_attention_kernel(Q, K, V, VALID, B, H, LQ, LK, OUT, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, SCALE: tl.constexpr, CAUSAL: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    pos = rows + (LK - LQ)
    d = tl.arange(0, HEAD_PAD)  # a power of two >= 16 (tl.dot needs K >= 16); lanes >= HEAD_DIM are 0
    d_ok = d < HEAD_DIM
    q_off = ((b * H + h) * LQ + rows) * HEAD_DIM
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    valid = tl.minimum(tl.maximum(tl.load(VALID + b), 0), LK).to(tl.int32)  # clamped in int64: no wrap
    start = LK - valid
    first_pos = pid_m * BLOCK_M + LK - LQ
    lo = tl.minimum(start, first_pos)
    if CAUSAL:
        hi = tl.minimum(LK, first_pos + BLOCK_M)
    else:
        hi = LK
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    kv_base = (b * H + h) * LK
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < LK
        kv_off = (kv_base + cols) * HEAD_DIM
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * SCALE
        if CAUSAL:
            see = ((cols[None, :] <= pos[:, None]) & (cols[None, :] >= start)) | (cols[None, :] == pos[:, None])
        else:
            see = (cols[None, :] >= start) | (cols[None, :] == pos[:, None])
        s = tl.where(see & col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(OUT + q_off[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def grid(b: int, h: int, lq: int, block_m: int = BLOCK_M):
    return ((lq + block_m - 1) // block_m, b * h)


def run_interpreted(q, k, v, valid, causal: int = 1, scale: float | None = None):
    """Run on CPU tensors through Triton's interpreter; ``causal`` as the node's attribute."""
    import torch

    b, h, lq, dh = q.shape
    out = torch.empty_like(q)
    require_interpreter()
    interpreted(tail_causal_attention_kernel)[grid(b, h, lq)](q.contiguous(), k.contiguous(), v.contiguous(),
                                          valid.to(torch.int64).contiguous(), b, h, lq, k.shape[2], out,
                                          HEAD_DIM=dh, HEAD_PAD=head_pad(dh), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                          SCALE=scale if scale is not None else 1.0 / math.sqrt(dh),
                                          CAUSAL=_causal(causal))
    return out


def signature(dtype: str) -> dict[str, str]:
    t = dtype_code(dtype)
    return {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "VALID": "*i64", "B": "i32", "H": "i32", "LQ": "i32",
            "LK": "i32", "OUT": f"*{t}", "HEAD_DIM": "constexpr", "HEAD_PAD": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
            "SCALE": "constexpr", "CAUSAL": "constexpr"}


def _causal(causal) -> int:
    if int(causal) not in (0, 1):
        raise ValueError(f"causal must be 0 or 1, got {causal!r}")
    return int(causal)


def compile(dtype: str = "float32", head_dim: int = 64, scale: float | None = None, arch: int = 90, causal: int = 1):
    """PTX/cubin for ``sm_<arch>``; the scale and the mode (``causal`` 1 or 0) are baked in (constexprs)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    return compile_aot(tail_causal_attention_kernel, signature(dtype), {"HEAD_DIM": head_dim, "HEAD_PAD": head_pad(head_dim), "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N,
                                                   "SCALE": float(scale), "CAUSAL": _causal(causal)}, arch=arch)
