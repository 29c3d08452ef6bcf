"""A OneTrans-style ranker with a SEP token and a pyramid, and a NAIVE candidate scorer.

Style (deliberately unlike onetrans_trt.models and unlike fused_qkv_cls.py):
- token order ``[S-tokens ; SEP ; NS-tokens]``: a learned SEP token closes the sequence;
- hand-written RMSNorm, pre-norm: ``z = x + attn(norm(x)); x' = z + ffn(norm(z))``, GELU FFN;
- mixed parameterization: the sequence tokens (S and SEP) share one Q/K/V/O and FFN, each
  NS-token position has its own (``einsum`` over per-token weight stacks);
- pyramid: layer l takes as queries only the newest ``QUERY_TAIL[l]`` positions of the whole
  sequence tail ``[S ; SEP]`` (so SEP is always kept); only those go on to layer l+1; the
  K/V of layer l cover all of layer l's input. The top layer's sequence outputs are unused.
- masks are additive float masks (0 / -inf) given to ``scaled_dot_product_attention``.

The candidate scorer is written the naive way on purpose (it is the pattern the toolkit's
rewrite turns into a shared-prefix attention): each layer copies the user's K/V per candidate
with ``expand``, concatenates the candidates' own K/V after it on the kv axis (K/V are
``[batch, heads, kv_len, head_dim]``, BHLD) and calls ``scaled_dot_product_attention`` with
an explicit mask (padding of the user's prefix masked from the history-length state tensor,
own NS tokens causal).

Masking: a sequence position is real when it is a real event or the SEP token; the number of
real positions in a left-padded tail of ``n`` positions is ``min(n_hist + 1, n)``. A padding
query sees only itself, so nothing is NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HIST_MAX = 512
QUERY_TAIL = (None, 64, 16)  # None: every [S ; SEP] position queries
N_ITEMS = 1000
N_CATS = 40
N_AGE, N_GENDER = 8, 3
CAND_DENSE = 6
D_MODEL = 32
N_HEADS = 4
N_NS = 4  # user token, item, category, dense
TASKS = ["click"]

SPEC: dict = {
    "name": "sep-pyramid",
    "inputs": [
        {"name": "hist_item", "side": "user", "dtype": "int64", "shape": ["users", "history"],
         "low": 1, "high": N_ITEMS},
        {"name": "hist_cat", "side": "user", "dtype": "int64", "shape": ["users", "history"],
         "low": 1, "high": N_CATS},
        {"name": "hist_len", "side": "user", "dtype": "int64", "shape": ["users"], "role": "history_length"},
        {"name": "user_age", "side": "user", "dtype": "int64", "shape": ["users"], "low": 0, "high": N_AGE},
        {"name": "user_gender", "side": "user", "dtype": "int64", "shape": ["users"], "low": 0, "high": N_GENDER},
        {"name": "cand_item", "side": "candidate", "dtype": "int64", "shape": ["candidates"],
         "low": 1, "high": N_ITEMS},
        {"name": "cand_cat", "side": "candidate", "dtype": "int64", "shape": ["candidates"],
         "low": 1, "high": N_CATS},
        {"name": "cand_dense", "side": "candidate", "dtype": "float32", "shape": ["candidates", CAND_DENSE]},
    ],
    "state": [
        {"name": "k0", "kind": "key", "layer": 0, "layout": "BHLD"},
        {"name": "v0", "kind": "value", "layer": 0, "layout": "BHLD"},
        {"name": "k1", "kind": "key", "layer": 1, "layout": "BHLD"},
        {"name": "v1", "kind": "value", "layer": 1, "layout": "BHLD"},
        {"name": "k2", "kind": "key", "layer": 2, "layout": "BHLD"},
        {"name": "v2", "kind": "value", "layer": 2, "layout": "BHLD"},
        {"name": "n_hist", "kind": "other"},
        {"name": "user_token", "kind": "other"},
    ],
    "tasks": TASKS,
    "history": {"max": HIST_MAX, "padding": "left"},
    "dims": {"users": [1, 2, 8], "candidates": [1, 128, 1024]},
}


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def to_heads(x: Tensor) -> Tensor:
    """[B, T, d] -> [B, H, T, dh]"""
    b, t, d = x.shape
    return x.reshape(b, t, N_HEADS, d // N_HEADS).transpose(1, 2)


def from_heads(x: Tensor) -> Tensor:
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


def additive(ok: Tensor) -> Tensor:
    zero = torch.zeros((), dtype=torch.float32, device=ok.device)
    return torch.where(ok, zero, torch.full_like(zero, float("-inf")))


class PerToken(nn.Module):
    """A linear map with its own weights for each of T token positions: [B, T, i] -> [B, T, o]."""

    def __init__(self, t: int, d_in: int, d_out: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(t, d_in, d_out) / d_in ** 0.5)
        self.b = nn.Parameter(torch.zeros(t, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bti,tio->bto", x, self.w) + self.b


class PyramidLayer(nn.Module):
    def __init__(self, d: int, t: int):
        super().__init__()
        # sequence (S and SEP) weights
        self.s_norm1 = nn.Parameter(torch.ones(d))
        self.s_q = nn.Linear(d, d, bias=False)
        self.s_k = nn.Linear(d, d, bias=False)
        self.s_v = nn.Linear(d, d, bias=False)
        self.s_o = nn.Linear(d, d, bias=False)
        self.s_norm2 = nn.Parameter(torch.ones(d))
        self.s_ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        # per-NS-token weights
        self.ns_norm1 = nn.Parameter(torch.ones(t, d))
        self.ns_q, self.ns_k, self.ns_v, self.ns_o = (PerToken(t, d, d) for _ in range(4))
        self.ns_norm2 = nn.Parameter(torch.ones(t, d))
        self.ns_up = PerToken(t, d, 2 * d)
        self.ns_down = PerToken(t, 2 * d, d)

    def seq_kv(self, x_seq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = rms_norm(x_seq, self.s_norm1)
        return h, to_heads(self.s_k(h)), to_heads(self.s_v(h))

    def ns_qkv(self, x_ns: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = rms_norm(x_ns, self.ns_norm1)
        return to_heads(self.ns_q(h)), to_heads(self.ns_k(h)), to_heads(self.ns_v(h))

    def seq_update(self, x: Tensor, attn: Tensor) -> Tensor:
        z = x + self.s_o(from_heads(attn))
        return z + self.s_ffn(rms_norm(z, self.s_norm2))

    def ns_update(self, x: Tensor, attn: Tensor) -> Tensor:
        z = x + self.ns_o(from_heads(attn))
        return z + self.ns_down(F.gelu(self.ns_up(rms_norm(z, self.ns_norm2))))


def real_positions(n: int, n_hist: Tensor) -> Tensor:
    """[B, n] bool: which of the newest n positions of [S ; SEP] are real (events or SEP)."""
    j = torch.arange(n, device=n_hist.device)
    return j.unsqueeze(0) >= (n - (n_hist.reshape(-1, 1) + 1))


def tail_query_mask(n: int, nq: int, n_hist: Tensor) -> Tensor:
    """[B, nq, n] bool: query i is position n - nq + i; it sees real keys at or before itself, and itself."""
    j = torch.arange(n, device=n_hist.device)
    pos = torch.arange(nq, device=n_hist.device) + (n - nq)
    causal = j.unsqueeze(0) <= pos.unsqueeze(1)
    itself = j.unsqueeze(0) == pos.unsqueeze(1)
    return (causal.unsqueeze(0) & real_positions(n, n_hist).unsqueeze(1)) | itself.unsqueeze(0)


class SepPyramidRanker(nn.Module):
    def __init__(self):
        super().__init__()
        d = D_MODEL
        self.item = nn.Embedding(N_ITEMS, d)
        self.cat = nn.Embedding(N_CATS, d)
        self.seq_in = nn.Linear(2 * d, d)
        self.sep = nn.Parameter(torch.randn(d))
        self.age = nn.Embedding(N_AGE, d)
        self.gender = nn.Embedding(N_GENDER, d)
        self.user_in = nn.Linear(d, d)
        self.dense_in = nn.Linear(CAND_DENSE, d)
        self.layers = nn.ModuleList([PyramidLayer(d, N_NS) for _ in QUERY_TAIL])
        self.final_norm = nn.Parameter(torch.ones(N_NS, d))
        self.head = nn.Sequential(nn.Linear(N_NS * d, d), nn.GELU(), nn.Linear(d, len(TASKS)))

    # ---- tokens ---------------------------------------------------------------------
    def seq_tokens(self, user: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """[S ; SEP] tokens [B, L+1, d] and n_hist [B, 1] (real events, clamped to [0, L])."""
        e = torch.cat([self.item(user["hist_item"]), self.cat(user["hist_cat"])], dim=-1)
        x = self.seq_in(e)
        b = x.shape[0]
        x = torch.cat([x, self.sep.view(1, 1, -1).expand(b, 1, -1)], dim=1)
        n_hist = user["hist_len"].clamp(min=0, max=user["hist_item"].shape[1]).reshape(b, 1)
        return x, n_hist

    def user_token(self, user: dict[str, Tensor]) -> Tensor:
        return self.user_in(F.gelu(self.age(user["user_age"]) + self.gender(user["user_gender"])))

    def ns_tokens(self, user_token: Tensor, cand: dict[str, Tensor]) -> Tensor:
        c = cand["cand_item"].shape[0]
        return torch.stack([user_token.expand(c, -1), self.item(cand["cand_item"]), self.cat(cand["cand_cat"]),
                            self.dense_in(cand["cand_dense"])], dim=1)

    def head_logits(self, x_ns: Tensor) -> Tensor:
        return self.head(rms_norm(x_ns, self.final_norm).flatten(1))

    # ---- unified ---------------------------------------------------------------------
    def _unified(self, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x_seq, n_hist = self.seq_tokens(inputs)
        user_token = self.user_token(inputs)
        x_ns = self.ns_tokens(user_token, inputs)
        b, t = x_ns.shape[0], x_ns.shape[1]
        state: dict[str, Tensor] = {}
        for i, (layer, keep) in enumerate(zip(self.layers, QUERY_TAIL)):
            n = x_seq.shape[1]
            h_seq, k_seq, v_seq = layer.seq_kv(x_seq)
            q_ns, k_ns, v_ns = layer.ns_qkv(x_ns)
            state[f"k{i}"], state[f"v{i}"] = k_seq, v_seq
            x_tail = x_seq if keep is None else x_seq[:, -keep:]
            h_tail = h_seq if keep is None else h_seq[:, -keep:]
            nq = x_tail.shape[1]
            q = torch.cat([to_heads(layer.s_q(h_tail)), q_ns], dim=2)
            k = torch.cat([k_seq, k_ns], dim=2)
            v = torch.cat([v_seq, v_ns], dim=2)
            tail_rows = torch.cat([tail_query_mask(n, nq, n_hist),
                                   torch.zeros(b, nq, t, dtype=torch.bool, device=q.device)], dim=2)
            ns_rows = torch.cat([real_positions(n, n_hist).unsqueeze(1).expand(b, t, n),
                                 torch.ones(t, t, dtype=torch.bool, device=q.device).tril().expand(b, t, t)], dim=2)
            mask = additive(torch.cat([tail_rows, ns_rows], dim=1)).unsqueeze(1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x_seq = layer.seq_update(x_tail, o[:, :, :nq])
            x_ns = layer.ns_update(x_ns, o[:, :, nq:])
        state["n_hist"] = n_hist
        state["user_token"] = user_token
        return self.head_logits(x_ns), state

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self._unified(inputs)[0]

    def unified_state(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._unified(inputs)[1]

    # ---- user side -------------------------------------------------------------------
    def encode_user(self, user: dict[str, Tensor]) -> dict[str, Tensor]:
        x_seq, n_hist = self.seq_tokens(user)
        state: dict[str, Tensor] = {}
        for i, (layer, keep) in enumerate(zip(self.layers, QUERY_TAIL)):
            n = x_seq.shape[1]
            h_seq, k_seq, v_seq = layer.seq_kv(x_seq)
            state[f"k{i}"], state[f"v{i}"] = k_seq, v_seq
            if i + 1 == len(self.layers):
                break  # the top layer's sequence outputs are never used
            x_tail = x_seq if keep is None else x_seq[:, -keep:]
            h_tail = h_seq if keep is None else h_seq[:, -keep:]
            nq = x_tail.shape[1]
            mask = additive(tail_query_mask(n, nq, n_hist)).unsqueeze(1)
            o = F.scaled_dot_product_attention(to_heads(layer.s_q(h_tail)), k_seq, v_seq, attn_mask=mask)
            x_seq = layer.seq_update(x_tail, o)
        state["n_hist"] = n_hist
        state["user_token"] = self.user_token(user)
        return state

    # ---- candidate side (naive on purpose) ------------------------------------------------
    def score_candidates(self, state: dict[str, Tensor], candidates: dict[str, Tensor]) -> Tensor:
        x_ns = self.ns_tokens(state["user_token"], candidates)
        c, t = x_ns.shape[0], x_ns.shape[1]
        n_hist = state["n_hist"]  # [1, 1]
        for i, layer in enumerate(self.layers):
            k_user, v_user = state[f"k{i}"], state[f"v{i}"]  # [1, H, n, dh]
            n = k_user.shape[2]
            q, k_own, v_own = layer.ns_qkv(x_ns)  # [C, H, T, dh]
            # the user's K/V copied for every candidate, then the candidate's own K/V after it
            k_user_expanded = k_user.expand(c, -1, -1, -1)
            v_user_expanded = v_user.expand(c, -1, -1, -1)
            k = torch.cat([k_user_expanded, k_own], dim=2)
            v = torch.cat([v_user_expanded, v_own], dim=2)
            prefix_ok = real_positions(n, n_hist).reshape(1, 1, 1, n).expand(1, 1, t, n)
            own_ok = torch.ones(t, t, dtype=torch.bool, device=q.device).tril().reshape(1, 1, t, t)
            mask = additive(torch.cat([prefix_ok, own_ok], dim=3))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x_ns = layer.ns_update(x_ns, o)
        return self.head_logits(x_ns)


def factory() -> nn.Module:
    torch.manual_seed(2024)
    model = SepPyramidRanker()
    with torch.no_grad():  # variance-preserving init, so the logits vary by O(1)
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, mod.in_features ** -0.5)
                if mod.bias is not None:
                    mod.bias.normal_(0.0, 0.1)
    return model.eval()


def example_inputs(n_users: int = 2, n_candidates: int = 3, seed: int = 0) -> tuple[dict, dict]:
    """(user inputs [U, ...], candidate inputs [C, ...]); histories left padded with zeros."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([[3, HIST_MAX // 2, 100, HIST_MAX, 0, 40][u % 6] for u in range(n_users)])
    real = torch.arange(HIST_MAX).unsqueeze(0) >= (HIST_MAX - lengths).unsqueeze(1)
    user = {"hist_item": torch.randint(1, N_ITEMS, (n_users, HIST_MAX), generator=g) * real,
            "hist_cat": torch.randint(1, N_CATS, (n_users, HIST_MAX), generator=g) * real,
            "hist_len": lengths.to(torch.int64),
            "user_age": torch.randint(0, N_AGE, (n_users,), generator=g),
            "user_gender": torch.randint(0, N_GENDER, (n_users,), generator=g)}
    cand = {"cand_item": torch.randint(1, N_ITEMS, (n_candidates,), generator=g),
            "cand_cat": torch.randint(1, N_CATS, (n_candidates,), generator=g),
            "cand_dense": torch.randn(n_candidates, CAND_DENSE, generator=g)}
    return user, cand


if __name__ == "__main__":  # python examples/sep_pyramid.py > examples/sep_pyramid.spec.json
    import json

    print(json.dumps(SPEC, indent=2))
