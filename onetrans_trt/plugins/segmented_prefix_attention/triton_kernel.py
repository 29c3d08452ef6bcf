"""SegmentedPrefixAttention as one flash-style Triton kernel.

One program per (block of BLOCK_M query rows among the C*T rows, head), as in the
SharedPrefixAttention kernel; the rows of one block may belong to different users. Each row
loads its candidate's user (``cand_user[row // T]``); the program then walks the users from
the block's smallest to its largest, and for each user ``u`` that has rows in the block
streams row ``u`` of the packed prefix K/V over its real tail ``[L - valid[u], L)`` in tiles
of BLOCK_N keys, with the scores of the rows of other users masked to -inf. Then the
candidates' own T keys, causal. One online softmax (running max, sum, fp32 accumulator) over
everything, -inf safe. Candidates sorted by user (what the packer sends) touch one or two
users per block; any order is exact, only slower (every user between the block's min and max
is visited, users without rows in the block skip their tiles).

A candidate whose ``cand_user`` is outside ``[0, U)`` reads no prefix memory and gets NaN
(the reference refuses such input; a kernel cannot raise, and an out-of-bounds read would
take the whole CUDA context down). Inputs may be fp32 or fp16; accumulation is fp32.
"""

from __future__ import annotations

import math

import triton.language as tl  # this module needs the 'kernels' extra; import it only then

from onetrans_trt.plugins._triton import compile_aot, dtype_code, head_pad, interpreted, require_interpreter

BLOCK_M = 16
BLOCK_N = 16


def segmented_prefix_attention_kernel(Q, KP, VP, VALID, USER, KO, VO, C, H, T, L, U, OUT, HEAD_DIM: tl.constexpr,
                                      HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                      SCALE: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < C * T
    cand = rows // T
    i = rows % T
    d = tl.arange(0, HEAD_PAD)  # a power of two >= 16 (tl.dot needs K >= 16); lanes >= HEAD_DIM are 0
    d_ok = d < HEAD_DIM
    q_off = ((cand * H + h) * T + i) * HEAD_DIM
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qf = q.to(tl.float32)
    # each row's user, range-checked in int64 before narrowing (a huge id must not wrap into range)
    user64 = tl.load(USER + cand, mask=row_ok, other=-1)
    in_range = row_ok & (user64 >= 0) & (user64 < U)
    user = tl.where(in_range, user64, -1).to(tl.int32)
    u_lo = tl.min(tl.where(in_range, user, 2147483647), 0)  # no row in range: lo > hi, no user visited
    u_hi = tl.max(user, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    for u in range(u_lo, u_hi + 1):
        mine = user == u
        valid = tl.minimum(tl.maximum(tl.load(VALID + u), 0), L).to(tl.int32)  # clamped in int64
        start = L - valid
        stop = tl.where(tl.max(mine.to(tl.int32), 0) > 0, L, start)  # no row of u here: no tile
        kv_base = (u * H + h) * L
        for n0 in range(start, stop, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < L
            kv_off = (kv_base + cols) * HEAD_DIM
            k = tl.load(KP + kv_off[:, None] + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * SCALE
            s = tl.where(mine[:, None] & col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(VP + kv_off[:, None] + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
    for tp in range(0, T):
        o_off = ((cand * H + h) * T + tp) * HEAD_DIM
        k = tl.load(KO + o_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.sum(qf * k, 1) * SCALE
        s = tl.where(tp <= i, s, float("-inf"))
        m_new = tl.maximum(m_i, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        l_i = l_i * alpha + p
        v = tl.load(VO + o_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + p[:, None] * v
        m_i = m_new
    out = acc / l_i[:, None]
    out = tl.where(in_range[:, None], out, float("nan"))  # a candidate of no user: NaN, never a wrong number
    tl.store(OUT + q_off[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def grid(c: int, h: int, t: int, block_m: int = BLOCK_M):
    """Launch grid: (row blocks over C*T, heads). Works on ints and on symbolic sizes."""
    return ((c * t + block_m - 1) // block_m, h)


def run_interpreted(q, k_prefix, v_prefix, prefix_valid, cand_user, k_own, v_own, scale: float | None = None):
    """Run on CPU tensors through Triton's interpreter; returns the output tensor."""
    import torch

    c, h, t, dh = q.shape
    out = torch.empty_like(q)
    args = [x.contiguous() for x in (q, k_prefix, v_prefix)] + \
        [x.reshape(-1).to(torch.int64).contiguous() for x in (prefix_valid, cand_user)] + \
        [x.contiguous() for x in (k_own, v_own)]
    require_interpreter()
    interpreted(segmented_prefix_attention_kernel)[grid(c, h, t)](
        *args, c, h, t, k_prefix.shape[2], k_prefix.shape[0], out, HEAD_DIM=dh, HEAD_PAD=head_pad(dh),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SCALE=scale if scale is not None else 1.0 / math.sqrt(dh))
    return out


def signature(dtype: str) -> dict[str, str]:
    t = dtype_code(dtype)
    return {"Q": f"*{t}", "KP": f"*{t}", "VP": f"*{t}", "VALID": "*i64", "USER": "*i64", "KO": f"*{t}",
            "VO": f"*{t}", "C": "i32", "H": "i32", "T": "i32", "L": "i32", "U": "i32", "OUT": f"*{t}",
            "HEAD_DIM": "constexpr", "HEAD_PAD": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
            "SCALE": "constexpr"}


def compile(dtype: str = "float32", head_dim: int = 64, scale: float | None = None, arch: int = 90):
    """PTX/cubin for ``sm_<arch>``; the scale is baked in (a constexpr)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    return compile_aot(segmented_prefix_attention_kernel, signature(dtype),
                       {"HEAD_DIM": head_dim, "HEAD_PAD": head_pad(head_dim), "BLOCK_M": BLOCK_M,
                        "BLOCK_N": BLOCK_N, "SCALE": float(scale)}, arch=arch)
