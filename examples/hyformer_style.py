"""A HyFormer-style ranker: per-sequence encoders, global queries decoding by cross-attention,
RankMixer-style token mixing.

Style (deliberately unlike onetrans_trt.models and the other examples):
- two behaviour sequences (clicks: the long, left-padded history; buys: a short fixed window
  with its own length), each with its own sequence encoder per layer (pre-LayerNorm,
  bidirectional self-attention over the real events, GELU FFN);
- per sequence, N global query tokens made by an MLP from
  ``concat(candidate features, mean-pool(sequence))``; in each layer they decode their sequence
  by cross-attention over THAT layer's encoder K/V (plus a learned null key/value, so an empty
  history gives a finite answer);
- then token mixing over ``[queries(clicks) ; queries(buys) ; NS-tokens]`` as in RankMixer:
  each token split into M chunks, chunks regrouped into M new tokens, residual + LayerNorm,
  per-token FFN, residual + LayerNorm (post-norm);
- K/V are kept as ``[batch, kv_len, heads, head_dim]`` (BLHD).

The sequence K/V never depend on the candidate, so the user state is: per layer and per
sequence the encoder's K/V, each sequence's mean-pool, the user's feature token and the two
history lengths. The spec numbers the K/V pairs 0..3 (clicks layer 0, buys layer 0, clicks
layer 1, buys layer 1): one spec "layer" per attention that reads a cached K/V pair.

The candidate scorer does not copy the K/V per candidate: all C*N queries of a sequence are
one batch of queries against the one user's K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLICK_MAX = 16
BUY_WINDOW = 6
N_ITEMS = 800
USER_DENSE = 5
CAND_DENSE = 3
D_MODEL = 32
N_HEADS = 4
HEAD_DIM = D_MODEL // N_HEADS
N_LAYERS = 2
N_QUERIES = 2  # global query tokens per sequence
N_NS = 4  # user, item, dense, user x item
N_MIX = 2 * N_QUERIES + N_NS  # tokens in the mixer; D_MODEL must split into N_MIX chunks
SEQS = ("a", "b")  # a: clicks, b: buys
TASKS = ["click", "finish"]

SPEC: dict = {
    "name": "hyformer-style",
    "inputs": [
        {"name": "click_item", "side": "user", "dtype": "int64", "shape": ["users", "history"],
         "low": 1, "high": N_ITEMS},
        {"name": "click_len", "side": "user", "dtype": "int64", "shape": ["users"], "role": "history_length"},
        {"name": "buy_item", "side": "user", "dtype": "int64", "shape": ["users", BUY_WINDOW],
         "low": 1, "high": N_ITEMS},
        {"name": "buy_len", "side": "user", "dtype": "int64", "shape": ["users"], "low": 0, "high": BUY_WINDOW + 3},
        {"name": "user_dense", "side": "user", "dtype": "float32", "shape": ["users", USER_DENSE]},
        {"name": "cand_item", "side": "candidate", "dtype": "int64", "shape": ["candidates"],
         "low": 1, "high": N_ITEMS},
        {"name": "cand_dense", "side": "candidate", "dtype": "float32", "shape": ["candidates", CAND_DENSE]},
    ],
    "state": [
        {"name": f"{s}_{kv}{layer}", "kind": "key" if kv == "k" else "value",
         "layer": 2 * layer + i, "layout": "BLHD"}
        for layer in range(N_LAYERS) for i, s in enumerate(SEQS) for kv in ("k", "v")
    ] + [
        {"name": "pool_a", "kind": "other"},
        {"name": "pool_b", "kind": "other"},
        {"name": "user_tok", "kind": "other"},
        {"name": "n_a", "kind": "other"},
        {"name": "n_b", "kind": "other"},
    ],
    "tasks": TASKS,
    "history": {"max": CLICK_MAX, "padding": "left"},
    "dims": {"users": [1, 2, 16], "candidates": [1, 64, 512]},
}


def real_mask(n: int, n_real: Tensor) -> Tensor:
    """[B, n] bool for a left-padded axis of n positions with n_real real ones at the end."""
    j = torch.arange(n, device=n_real.device)
    return j.unsqueeze(0) >= (n - n_real).unsqueeze(1)


class SeqEncoderLayer(nn.Module):
    """Pre-norm bidirectional transformer layer over one sequence; K/V in BLHD."""

    def __init__(self, d: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.wq = nn.Linear(d, d)
        self.wk = nn.Linear(d, d)
        self.wv = nn.Linear(d, d)
        self.wo = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, n, _ = x.shape
        h = self.ln1(x)
        return self.wk(h).view(b, n, N_HEADS, HEAD_DIM), self.wv(h).view(b, n, N_HEADS, HEAD_DIM)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, n_real: Tensor) -> Tensor:
        b, n, d = x.shape
        q = self.wq(self.ln1(x)).view(b, n, N_HEADS, HEAD_DIM)
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        ok = real_mask(n, n_real).unsqueeze(1) | eye.unsqueeze(0)  # [B, n, n]: padding sees itself
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=ok.unsqueeze(1))
        x = x + self.wo(o.transpose(1, 2).reshape(b, n, d))
        return x + self.ffn(self.ln2(x))


class QueryDecoder(nn.Module):
    """Cross-attention of the global query tokens over one sequence's K/V (+ a null key/value)."""

    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.wq = nn.Linear(d, d)
        self.wo = nn.Linear(d, d)
        self.null_k = nn.Parameter(torch.randn(1, 1, N_HEADS, HEAD_DIM) * 0.5)
        self.null_v = nn.Parameter(torch.randn(1, 1, N_HEADS, HEAD_DIM) * 0.5)

    def with_null(self, k: Tensor, v: Tensor, n_real: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """K/V [B, 1+L, H, dh] with the null slot first, and the key mask [B, 1+L]."""
        b, n = k.shape[0], k.shape[1]
        k = torch.cat([self.null_k.expand(b, 1, N_HEADS, HEAD_DIM), k], dim=1)
        v = torch.cat([self.null_v.expand(b, 1, N_HEADS, HEAD_DIM), v], dim=1)
        ok = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=k.device), real_mask(n, n_real)], dim=1)
        return k, v, ok

    def per_row(self, qt: Tensor, k: Tensor, v: Tensor, n_real: Tensor) -> Tensor:
        """Unified: row b's queries [B, N, d] against row b's K/V [B, L, H, dh]."""
        b, nq, d = qt.shape
        k, v, ok = self.with_null(k, v, n_real)
        q = self.wq(self.ln(qt)).view(b, nq, N_HEADS, HEAD_DIM).transpose(1, 2)
        mask = ok[:, None, None, :].expand(b, 1, nq, ok.shape[1])  # ORT's Attention wants the query axis
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return qt + self.wo(o.transpose(1, 2).reshape(b, nq, d))

    def shared(self, qt: Tensor, k: Tensor, v: Tensor, n_real: Tensor) -> Tensor:
        """Split: C candidates' queries [C, N, d] against ONE user's K/V [1, L, H, dh]."""
        c, nq, d = qt.shape
        k, v, ok = self.with_null(k, v, n_real)
        q = self.wq(self.ln(qt)).view(c * nq, N_HEADS, HEAD_DIM).transpose(0, 1).unsqueeze(0)  # [1, H, C*N, dh]
        mask = ok[:, None, None, :].expand(1, 1, c * nq, ok.shape[1])
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        o = o.squeeze(0).transpose(0, 1).reshape(c, nq, d)
        return qt + self.wo(o)


class TokenMixer(nn.Module):
    """RankMixer-style: chunk, regroup, LN(mix + x); per-token FFN, LN(ffn + s)."""

    def __init__(self, m: int, d: int):
        super().__init__()
        self.m = m
        self.ln1 = nn.LayerNorm(d)
        self.w1 = nn.Parameter(torch.randn(m, d, 2 * d) / d ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(m, 2 * d))
        self.w2 = nn.Parameter(torch.randn(m, 2 * d, d) / (2 * d) ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(m, d))
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        b, m, d = x.shape
        mixed = x.reshape(b, m, m, d // m).transpose(1, 2).reshape(b, m, d)
        s = self.ln1(mixed + x)
        h = F.gelu(torch.einsum("bmd,mdf->bmf", s, self.w1) + self.b1)
        return self.ln2(torch.einsum("bmf,mfd->bmd", h, self.w2) + self.b2 + s)


class HyFormerStyle(nn.Module):
    def __init__(self):
        super().__init__()
        d = D_MODEL
        self.item = nn.Embedding(N_ITEMS, d)
        self.pos = nn.ParameterDict({"a": nn.Parameter(torch.randn(CLICK_MAX, d) * 0.1),
                                     "b": nn.Parameter(torch.randn(BUY_WINDOW, d) * 0.1)})
        self.encoders = nn.ModuleDict({s: nn.ModuleList([SeqEncoderLayer(d) for _ in range(N_LAYERS)]) for s in SEQS})
        self.decoders = nn.ModuleDict({s: nn.ModuleList([QueryDecoder(d) for _ in range(N_LAYERS)]) for s in SEQS})
        self.query_mlp = nn.ModuleDict({s: nn.Sequential(nn.Linear(3 * d, 2 * d), nn.GELU(),
                                                         nn.Linear(2 * d, N_QUERIES * d)) for s in SEQS})
        self.user_mlp = nn.Sequential(nn.Linear(USER_DENSE, d), nn.GELU(), nn.Linear(d, d))
        self.dense_in = nn.Linear(CAND_DENSE, d)
        self.cross = nn.Sequential(nn.Linear(2 * d, d), nn.GELU())
        self.mixers = nn.ModuleList([TokenMixer(N_MIX, d) for _ in range(N_LAYERS)])
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, len(TASKS)))

    # ---- the user side: identical in the unified and the split paths ------------------------
    def sequence(self, s: str, items: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
        """Embedded sequence [B, L, d] (age-indexed positions) and its clamped length [B]."""
        n = items.shape[1]
        pos = self.pos[s]
        ages = ((n - 1) - torch.arange(n, device=items.device)).clamp(max=pos.shape[0] - 1)
        x = self.item(items) + pos[ages].unsqueeze(0)
        return x, length.clamp(min=0, max=n)

    def user_state(self, user: dict[str, Tensor]) -> dict[str, Tensor]:
        seqs = {"a": self.sequence("a", user["click_item"], user["click_len"]),
                "b": self.sequence("b", user["buy_item"], user["buy_len"])}
        kv: dict[str, Tensor] = {}
        pools: dict[str, Tensor] = {}
        for s, (x, n_real) in seqs.items():
            w = real_mask(x.shape[1], n_real).to(x.dtype).unsqueeze(-1)
            pools[s] = (x * w).sum(dim=1) / n_real.clamp(min=1).to(x.dtype).unsqueeze(-1)
            for layer, enc in enumerate(self.encoders[s]):
                k, v = enc.kv(x)
                kv[f"{s}_k{layer}"], kv[f"{s}_v{layer}"] = k, v
                if layer + 1 < N_LAYERS:
                    x = enc(x, k, v, n_real)
        state = {st["name"]: kv[st["name"]] for st in SPEC["state"] if st["kind"] != "other"}
        state.update(pool_a=pools["a"], pool_b=pools["b"], user_tok=self.user_mlp(user["user_dense"]),
                     n_a=seqs["a"][1], n_b=seqs["b"][1])
        return state

    # ---- the candidate side, given the state per row (unified) or one user's (split) ------------
    def _score(self, state: dict[str, Tensor], cand: dict[str, Tensor], shared: bool) -> Tensor:
        c = cand["cand_item"].shape[0]
        user_tok = state["user_tok"].expand(c, -1)
        item = self.item(cand["cand_item"])
        dense = self.dense_in(cand["cand_dense"])
        ns = torch.stack([user_tok, item, dense, self.cross(torch.cat([user_tok, item], dim=-1))], dim=1)
        queries = {s: self.query_mlp[s](torch.cat([item, dense, state[f"pool_{s}"].expand(c, -1)], dim=-1))
                   .view(c, N_QUERIES, D_MODEL) for s in SEQS}
        for layer in range(N_LAYERS):
            for s in SEQS:
                dec = self.decoders[s][layer]
                args = (queries[s], state[f"{s}_k{layer}"], state[f"{s}_v{layer}"], state[f"n_{s}"])
                queries[s] = dec.shared(*args) if shared else dec.per_row(*args)
            x = self.mixers[layer](torch.cat([queries["a"], queries["b"], ns], dim=1))
            queries = {"a": x[:, :N_QUERIES], "b": x[:, N_QUERIES:2 * N_QUERIES]}
            ns = x[:, 2 * N_QUERIES:]
        return self.head(x.mean(dim=1))

    # ---- the protocol ----------------------------------------------------------------------
    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self._score(self.user_state(inputs), inputs, shared=False)

    def unified_state(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.user_state(inputs)

    def encode_user(self, user: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.user_state(user)

    def score_candidates(self, state: dict[str, Tensor], candidates: dict[str, Tensor]) -> Tensor:
        return self._score(state, candidates, shared=True)


def factory() -> nn.Module:
    torch.manual_seed(7)
    model = HyFormerStyle()
    with torch.no_grad():  # variance-preserving init, so the logits vary by O(1)
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, mod.in_features ** -0.5)
                mod.bias.normal_(0.0, 0.1)
    return model.eval()


def example_inputs(n_users: int = 2, n_candidates: int = 3, seed: int = 0) -> tuple[dict, dict]:
    """(user inputs [U, ...], candidate inputs [C, ...]); both sequences left padded with zeros."""
    g = torch.Generator().manual_seed(seed)
    click_len = torch.tensor([[5, CLICK_MAX, 0, 1, 11][u % 5] for u in range(n_users)])
    buy_len = torch.tensor([[2, 0, BUY_WINDOW, 1, 4][u % 5] for u in range(n_users)])
    click_real = real_mask(CLICK_MAX, click_len)
    buy_real = real_mask(BUY_WINDOW, buy_len)
    user = {"click_item": torch.randint(1, N_ITEMS, (n_users, CLICK_MAX), generator=g) * click_real,
            "click_len": click_len.to(torch.int64),
            "buy_item": torch.randint(1, N_ITEMS, (n_users, BUY_WINDOW), generator=g) * buy_real,
            "buy_len": buy_len.to(torch.int64),
            "user_dense": torch.randn(n_users, USER_DENSE, generator=g)}
    cand = {"cand_item": torch.randint(1, N_ITEMS, (n_candidates,), generator=g),
            "cand_dense": torch.randn(n_candidates, CAND_DENSE, generator=g)}
    return user, cand


if __name__ == "__main__":  # python examples/hyformer_style.py > examples/hyformer_style.spec.json
    import json

    print(json.dumps(SPEC, indent=2))
