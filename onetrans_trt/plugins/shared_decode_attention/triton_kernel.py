"""SharedDecodeAttention as one flash-style Triton kernel.

One program per (block of BLOCK_M query rows among the C*N rows, head). It streams the
shared K/V's real tail ``[n - min(valid, n), n)`` in tiles of BLOCK_N keys (every candidate's
queries share the tiles: the K/V is read once per row block, never copied per candidate),
keeping an online softmax (running max, sum, fp32 accumulator). A row with no real key
(valid <= 0, or n == 0) runs no tile and its sum stays 0: it is written as 0, never NaN.
Inputs may be fp32 or fp16; accumulation is fp32.
"""

from __future__ import annotations

import math

import triton.language as tl  # this module needs the 'kernels' extra; import it only then

from onetrans_trt.plugins._triton import compile_aot, dtype_code, head_pad, interpreted, require_interpreter

BLOCK_M = 16
BLOCK_N = 16


def shared_decode_attention_kernel(Q, K, V, VALID, C, H, NQ, LK, OUT, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALE: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < C * NQ
    cand = rows // NQ
    i = rows % NQ
    d = tl.arange(0, HEAD_PAD)  # a power of two >= 16 (tl.dot needs K >= 16); lanes >= HEAD_DIM are 0
    d_ok = d < HEAD_DIM
    q_off = ((cand * H + h) * NQ + i) * HEAD_DIM
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    valid = tl.minimum(tl.maximum(tl.load(VALID), 0), LK).to(tl.int32)  # clamped in int64: no wrap
    start = LK - valid
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    for n0 in range(start, LK, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < LK
        kv_off = (h * LK + cols) * HEAD_DIM
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * SCALE
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no real key: acc is 0, so is the row
    tl.store(OUT + q_off[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def grid(c: int, h: int, nq: int, block_m: int = BLOCK_M):
    """Launch grid: (row blocks over C*N, heads). Works on ints and on symbolic sizes."""
    return ((c * nq + block_m - 1) // block_m, h)


def run_interpreted(q, k, v, valid, scale: float | None = None):
    """Run on CPU tensors through Triton's interpreter; returns the output tensor."""
    import torch

    c, h, nq, dh = q.shape
    out = torch.empty_like(q)
    require_interpreter()
    interpreted(shared_decode_attention_kernel)[grid(c, h, nq)](
        q.contiguous(), k.contiguous(), v.contiguous(), valid.reshape(-1).to(torch.int64).contiguous(),
        c, h, nq, k.shape[2], out, HEAD_DIM=dh, HEAD_PAD=head_pad(dh), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        SCALE=scale if scale is not None else 1.0 / math.sqrt(dh))
    return out


def signature(dtype: str) -> dict[str, str]:
    t = dtype_code(dtype)
    return {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "VALID": "*i64", "C": "i32", "H": "i32", "NQ": "i32",
            "LK": "i32", "OUT": f"*{t}", "HEAD_DIM": "constexpr", "HEAD_PAD": "constexpr", "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr", "SCALE": "constexpr"}


def compile(dtype: str = "float32", head_dim: int = 64, scale: float | None = None, arch: int = 90):
    """PTX/cubin for ``sm_<arch>``; the scale is baked in (a constexpr)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    return compile_aot(shared_decode_attention_kernel, signature(dtype),
                       {"HEAD_DIM": head_dim, "HEAD_PAD": head_pad(head_dim), "BLOCK_M": BLOCK_M,
                        "BLOCK_N": BLOCK_N, "SCALE": float(scale)}, arch=arch)
