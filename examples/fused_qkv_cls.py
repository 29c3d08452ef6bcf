"""A OneTrans-style ranker written the way many public code bases write it.

Style (deliberately unlike onetrans_trt.models):
- one fused ``nn.Linear(d, 3d)`` with biases for Q/K/V, an output projection with bias;
- LayerNorm AFTER the residual (post-norm): ``x = LN(x + attn(x)); x = LN(x + ffn(x))``;
- SiLU feed-forward; one set of weights shared by every token (no mixed parameterization);
- a learned position embedding for the S-tokens, indexed by age (0 = newest event);
- token order ``[S-tokens ; NS-tokens ; CLS]``; the CLS token's final state feeds the head.

Mask: an S-token sees the real S-tokens up to itself (a padding S-token sees only itself, so
nothing is NaN); NS and CLS tokens see every real S-token and the NS tokens up to themselves.
No S-token ever sees an NS token, so the S side is the cacheable user state.

The candidate scorer never copies the user's K/V per candidate: it scores the candidates'
queries against the shared K/V with one broadcasting matmul and against their own keys
with another, and takes one softmax over the two score blocks side by side.

Protocol: ``forward`` (unified), ``encode_user``, ``score_candidates``, ``unified_state``;
``factory()``, ``SPEC`` and ``example_inputs()`` for the toolkit (see examples/README.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HIST_MAX = 20
N_ITEMS = 500
N_ACTIONS = 3
USER_DENSE = 8
CAND_DENSE = 4
D_MODEL = 32
N_HEADS = 4
N_LAYERS = 2
TASKS = ["click", "like"]

SPEC: dict = {
    "name": "fused-qkv-cls",
    "inputs": [
        {"name": "hist_item", "side": "user", "dtype": "int64", "shape": ["users", "history"],
         "low": 1, "high": N_ITEMS},
        {"name": "hist_action", "side": "user", "dtype": "int64", "shape": ["users", "history"],
         "low": 0, "high": N_ACTIONS},
        {"name": "hist_len", "side": "user", "dtype": "int64", "shape": ["users"], "role": "history_length"},
        {"name": "user_dense", "side": "user", "dtype": "float32", "shape": ["users", USER_DENSE]},
        {"name": "cand_item", "side": "candidate", "dtype": "int64", "shape": ["candidates"],
         "low": 1, "high": N_ITEMS},
        {"name": "cand_dense", "side": "candidate", "dtype": "float32", "shape": ["candidates", CAND_DENSE]},
    ],
    "state": [
        {"name": "k0", "kind": "key", "layer": 0, "layout": "BHLD"},
        {"name": "v0", "kind": "value", "layer": 0, "layout": "BHLD"},
        {"name": "k1", "kind": "key", "layer": 1, "layout": "BHLD"},
        {"name": "v1", "kind": "value", "layer": 1, "layout": "BHLD"},
        {"name": "n_hist", "kind": "other"},
        {"name": "user_tok", "kind": "other"},
    ],
    "tasks": TASKS,
    "history": {"max": HIST_MAX, "padding": "left"},
    "dims": {"users": [1, 2, 16], "candidates": [1, 64, 512]},
}


class PostNormBlock(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)  # fused, with bias
        self.proj = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.ln2 = nn.LayerNorm(d)

    def heads_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, d] -> q, k, v each [B, H, T, dh]."""
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """attn [B, H, T, dh] -> the block's output (post-norm residuals)."""
        b, h, t, dh = attn.shape
        x = self.ln1(x + self.proj(attn.transpose(1, 2).reshape(b, t, h * dh)))
        return self.ln2(x + self.ffn(x))


class FusedQKVRanker(nn.Module):
    def __init__(self):
        super().__init__()
        d = D_MODEL
        self.item = nn.Embedding(N_ITEMS, d)
        self.action = nn.Embedding(N_ACTIONS, d)
        self.age = nn.Embedding(HIST_MAX, d)  # learned position embedding, by age
        self.user_proj = nn.Sequential(nn.Linear(USER_DENSE, d), nn.SiLU(), nn.Linear(d, d))
        self.cand_proj = nn.Linear(CAND_DENSE, d)
        self.cls = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList([PostNormBlock(d, N_HEADS) for _ in range(N_LAYERS)])
        self.head = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, len(TASKS)))

    # ---- tokens --------------------------------------------------------------------
    def s_tokens(self, user: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """S-tokens [B, L, d] (left padded) and the number of real ones, clamped to [0, L]."""
        items = user["hist_item"]
        length = items.shape[1]
        ages = (length - 1) - torch.arange(length, device=items.device)
        ages = ages.clamp(max=HIST_MAX - 1)  # a longer padded axis reuses the oldest age
        x = self.item(items) + self.action(user["hist_action"]) + self.age(ages).unsqueeze(0)
        n_real = user["hist_len"].clamp(min=0, max=length)
        return x, n_real

    def user_token(self, user_dense: Tensor) -> Tensor:
        return self.user_proj(user_dense)

    def ns_tokens(self, user_tok: Tensor, cand: dict[str, Tensor]) -> Tensor:
        """[NS-tokens ; CLS] : [C, 4, d]. user_tok [C or 1, d]."""
        c = cand["cand_item"].shape[0]
        user_tok = user_tok.expand(c, -1)
        cls = self.cls.expand(c, -1)
        return torch.stack([user_tok, self.item(cand["cand_item"]), self.cand_proj(cand["cand_dense"]), cls], dim=1)

    @staticmethod
    def real_keys(n_keys: int, n_real: Tensor) -> Tensor:
        """[B, n_keys] bool: key j of a left-padded axis is a real event."""
        j = torch.arange(n_keys, device=n_real.device)
        return j.unsqueeze(0) >= (n_keys - n_real).unsqueeze(1)

    def s_mask(self, n: int, n_real: Tensor) -> Tensor:
        """[B, 1, n, n]: S-token i sees real S-tokens j <= i, and itself."""
        j = torch.arange(n, device=n_real.device)
        causal = j.unsqueeze(0) <= j.unsqueeze(1)
        eye = j.unsqueeze(0) == j.unsqueeze(1)
        real = self.real_keys(n, n_real).unsqueeze(1)
        return ((causal & real) | eye).unsqueeze(1)

    def full_mask(self, n: int, t: int, n_real: Tensor) -> Tensor:
        """[B, 1, n+t, n+t] over [S ; NS ; CLS]."""
        b = n_real.shape[0]
        s_rows = torch.cat([self.s_mask(n, n_real)[:, 0],
                            torch.zeros(b, n, t, dtype=torch.bool, device=n_real.device)], dim=2)
        ns_see_s = self.real_keys(n, n_real).unsqueeze(1).expand(b, t, n)
        ns_see_ns = torch.ones(t, t, dtype=torch.bool, device=n_real.device).tril().expand(b, t, t)
        return torch.cat([s_rows, torch.cat([ns_see_s, ns_see_ns], dim=2)], dim=1).unsqueeze(1)

    # ---- unified ---------------------------------------------------------------------
    def _unified(self, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x_s, n_real = self.s_tokens(inputs)
        n = x_s.shape[1]
        user_tok = self.user_token(inputs["user_dense"])
        x = torch.cat([x_s, self.ns_tokens(user_tok, inputs)], dim=1)
        mask = self.full_mask(n, x.shape[1] - n, n_real)
        state: dict[str, Tensor] = {}
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.heads_qkv(x)
            state[f"k{i}"], state[f"v{i}"] = k[:, :, :n], v[:, :, :n]
            x = blk.finish(x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        state["n_hist"] = n_real
        state["user_tok"] = user_tok
        return self.head(x[:, -1]), state

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self._unified(inputs)[0]

    def unified_state(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._unified(inputs)[1]

    # ---- user side -------------------------------------------------------------------
    def encode_user(self, user: dict[str, Tensor]) -> dict[str, Tensor]:
        x, n_real = self.s_tokens(user)
        mask = self.s_mask(x.shape[1], n_real)
        state: dict[str, Tensor] = {}
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.heads_qkv(x)
            state[f"k{i}"], state[f"v{i}"] = k, v
            if i + 1 < len(self.blocks):  # the top block's S outputs are never used
                x = blk.finish(x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        state["n_hist"] = n_real
        state["user_tok"] = self.user_token(user["user_dense"])
        return state

    # ---- candidate side ----------------------------------------------------------------
    def score_candidates(self, state: dict[str, Tensor], candidates: dict[str, Tensor]) -> Tensor:
        x = self.ns_tokens(state["user_tok"], candidates)  # [C, T, d]
        t = x.shape[1]
        own_ok = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.heads_qkv(x)  # [C, H, T, dh]
            k_user, v_user = state[f"k{i}"], state[f"v{i}"]  # [1, H, L, dh], shared
            n = k_user.shape[2]
            scale = 1.0 / math.sqrt(q.shape[-1])
            s_user = torch.matmul(q, k_user.transpose(-1, -2)) * scale  # [C, H, T, L]
            s_user = s_user.masked_fill(~self.real_keys(n, state["n_hist"]).view(1, 1, 1, n), float("-inf"))
            s_own = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~own_ok, float("-inf"))
            p = torch.softmax(torch.cat([s_user, s_own], dim=-1), dim=-1)
            p_user, p_own = torch.split(p, [n, t], dim=-1)
            x = blk.finish(x, torch.matmul(p_user, v_user) + torch.matmul(p_own, v))
        return self.head(x[:, -1])


def factory() -> nn.Module:
    torch.manual_seed(1234)
    model = FusedQKVRanker()
    with torch.no_grad():  # variance-preserving init, so the logits vary by O(1)
        model.cls.normal_(0.0, 1.0)
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, mod.in_features ** -0.5)
                mod.bias.normal_(0.0, 0.1)
    return model.eval()


def example_inputs(n_users: int = 2, n_candidates: int = 3, seed: int = 0) -> tuple[dict, dict]:
    """(user inputs [U, ...], candidate inputs [C, ...]); histories left padded with zeros."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([(HIST_MAX * (u + 1)) // (n_users + 1) + (u % 2) * 3 for u in range(n_users)])
    lengths = lengths.clamp(max=HIST_MAX)
    real = torch.arange(HIST_MAX).unsqueeze(0) >= (HIST_MAX - lengths).unsqueeze(1)
    items = torch.randint(1, N_ITEMS, (n_users, HIST_MAX), generator=g) * real
    actions = torch.randint(0, N_ACTIONS, (n_users, HIST_MAX), generator=g) * real
    user = {"hist_item": items, "hist_action": actions, "hist_len": lengths.to(torch.int64),
            "user_dense": torch.randn(n_users, USER_DENSE, generator=g)}
    cand = {"cand_item": torch.randint(1, N_ITEMS, (n_candidates,), generator=g),
            "cand_dense": torch.randn(n_candidates, CAND_DENSE, generator=g)}
    return user, cand


if __name__ == "__main__":  # python examples/fused_qkv_cls.py > examples/fused_qkv_cls.spec.json
    import json

    print(json.dumps(SPEC, indent=2))
