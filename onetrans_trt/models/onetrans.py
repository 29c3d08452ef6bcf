"""OneTrans (arXiv 2510.26104): one causal transformer over ``[S-tokens ; NS-tokens]``.

Three entry points compute the same numbers:

- ``model(batch)``: the **unified** forward, one sequence per (user, candidate) pair and
  one attention over the whole of it under the S/NS causal mask;
- ``model.encode_user(history)``: the **user encoder**, the S side alone, returning each
  layer's S-token K/V (:class:`UserKV`; layer ``l``'s K/V hold the S-tokens layer
  ``l-1`` kept);
- ``model.score_candidates(user_kv, candidates)``: the **candidate scorer**, the NS side
  of C candidates of one user attending the cached K/V (never copied per candidate).

Causality makes the split exact: no S-token ever attends an NS-token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onetrans_trt.kv import UserKV  # noqa: F401  (re-exported)
from onetrans_trt.models.attention import (
    masked_attention,
    merge_heads,
    prefix_key_mask,
    shared_prefix_attention,
    split_heads,
    tail_causal_attention,
    tail_causal_mask,
)
from onetrans_trt.models.blocks import FFN, MLP, MixedLinear, RMSNorm
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.tokenizers import Embeddings, STokenizer, newest_tokens, ns_tokenizer_for


class OneTransLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, s_queries: bool):
        super().__init__()
        d, t, f = cfg.d_model, cfg.num_ns_tokens, cfg.d_model * cfg.ffn_mult
        self.n_heads = cfg.n_heads
        self.s_queries = s_queries  # False for the top layer: its S outputs are never used
        self.slice_first = cfg.pyramid_impl == "slice_first"
        self.s_norm1 = RMSNorm(d)
        self.s_k = nn.Linear(d, d, bias=False)
        self.s_v = nn.Linear(d, d, bias=False)
        if s_queries:
            self.s_q = nn.Linear(d, d, bias=False)
            self.s_o = nn.Linear(d, d, bias=False)
            self.s_norm2 = RMSNorm(d)
            self.s_ffn = FFN(d, f)
        self.ns_norm1 = RMSNorm(d, tokens=t)
        self.ns_q = MixedLinear(t, d, d)
        self.ns_k = MixedLinear(t, d, d)
        self.ns_v = MixedLinear(t, d, d)
        self.ns_o = MixedLinear(t, d, d)
        self.ns_norm2 = RMSNorm(d, tokens=t)
        self.ns_ffn = FFN(d, f, tokens=t)

    # -- pieces shared by the unified and the split paths ----------------------------
    def s_update(self, x_tail: Tensor, attn: Tensor) -> Tensor:
        z = x_tail + self.s_o(attn)
        return z + self.s_ffn(self.s_norm2(z))

    def ns_update(self, x_ns: Tensor, attn: Tensor, token_major: bool = False) -> Tensor:
        """``token_major``: ``x_ns``/``attn`` are ``[T, C, d]`` (the candidate scorer's layout)."""
        z = x_ns + self.ns_o(attn, token_major=token_major)
        return z + self.ns_ffn(self.ns_norm2(z, token_major=token_major), token_major=token_major)

    # -- unified ---------------------------------------------------------------------
    def forward_unified(self, x_s: Tensor, x_ns: Tensor, length: Tensor, n_queries: int | None):
        n, t, h = x_s.shape[1], x_ns.shape[1], self.n_heads
        valid = length.clamp(max=n)
        hs, hns = self.s_norm1(x_s), self.ns_norm1(x_ns)
        k = torch.cat([self.s_k(hs), self.ns_k(hns)], dim=1)
        v = torch.cat([self.s_v(hs), self.ns_v(hns)], dim=1)
        q_ns = self.ns_q(hns)
        if self.s_queries:
            x_tail = x_s if n_queries is None else x_s[:, -n_queries:]
            hs_tail = hs if n_queries is None else hs[:, -n_queries:]
            q = torch.cat([self.s_q(hs_tail), q_ns], dim=1)
            nq = x_tail.shape[1]
        else:
            q, nq = q_ns, 0
        # Mask over keys [S (n) ; NS (t)] for queries [S tail (nq) ; NS (t)].
        b = x_s.shape[0]
        s_rows = torch.cat([tail_causal_mask(n, nq, valid)[:, 0],
                            torch.zeros(b, nq, t, dtype=torch.bool, device=x_s.device)], dim=2)
        real = prefix_key_mask(n, valid).unsqueeze(1).expand(b, t, n)
        causal_ns = torch.ones(t, t, dtype=torch.bool, device=x_s.device).tril().expand(b, t, t)
        ns_rows = torch.cat([real, causal_ns], dim=2)
        mask = torch.cat([s_rows, ns_rows], dim=1).unsqueeze(1)
        o = merge_heads(masked_attention(split_heads(q, h), split_heads(k, h), split_heads(v, h), mask))
        new_ns = self.ns_update(x_ns, o[:, nq:])
        new_s = self.s_update(x_tail, o[:, :nq]) if self.s_queries else x_s[:, :0]
        return new_s, new_ns

    # -- user side -------------------------------------------------------------------
    def encode_s(self, x_s: Tensor, length: Tensor, n_queries: int | None):
        """Return (K, V) of this layer's S-tokens and the S-tokens passed upward."""
        h = self.n_heads
        hs = self.s_norm1(x_s)
        k, v = split_heads(self.s_k(hs), h), split_heads(self.s_v(hs), h)
        if not self.s_queries:
            return k, v, None
        valid = length.clamp(max=x_s.shape[1])
        if not self.slice_first:  # the whole layer for every S-token, then keep the tail
            o = merge_heads(tail_causal_attention(split_heads(self.s_q(hs), h), k, v, valid))
            z = self.s_update(x_s, o)
            return k, v, (z if n_queries is None else z[:, -n_queries:])
        x_tail = x_s if n_queries is None else x_s[:, -n_queries:]
        hs_tail = hs if n_queries is None else hs[:, -n_queries:]
        q = split_heads(self.s_q(hs_tail), h)
        o = merge_heads(tail_causal_attention(q, k, v, valid))
        return k, v, self.s_update(x_tail, o)

    def append_s(self, x_new: Tensor, k_past: Tensor, v_past: Tensor, valid: Tensor, n_queries: int | None):
        """:meth:`encode_s` for S-tokens appended after cached ones (``models/append.py``).

        ``x_new`` ``[U, k, d]``: this layer's input for the k newest S-tokens; ``k_past`` /
        ``v_past`` ``[U, H, n, dh]``: the cached K/V of the tokens before them (left-padded);
        ``valid`` ``[U]``: real tokens among all ``n + k``. Returns the K/V of all ``n + k``
        tokens and the layer's output for the newest ``n_queries`` of the new ones (None: all);
        equal to :meth:`encode_s` over the whole window when the cached K/V are that window's.
        """
        h = self.n_heads
        hs = self.s_norm1(x_new)
        k = torch.cat([k_past, split_heads(self.s_k(hs), h)], dim=2)
        v = torch.cat([v_past, split_heads(self.s_v(hs), h)], dim=2)
        if not self.s_queries:
            return k, v, None
        x_tail = x_new if n_queries is None else x_new[:, -n_queries:]
        hs_tail = hs if n_queries is None else hs[:, -n_queries:]
        q = split_heads(self.s_q(hs_tail), h)
        o = merge_heads(tail_causal_attention(q, k, v, valid.clamp(max=k.shape[2])))
        return k, v, self.s_update(x_tail, o)

    # -- candidate side ----------------------------------------------------------------
    def score_ns(self, x_ns: Tensor, k_s: Tensor, v_s: Tensor, length: Tensor) -> Tensor:
        """The NS side of C candidates, token-major: ``x_ns`` ``[T, C, d]`` (NS-token position
        first) -> ``[T, C, d]``. Each NS-token's projections are then one batched product
        ``[T, C, d] @ [T, d, d]`` with no transposes around it; only the attention's inputs and
        output change layout (``[C, H, T, dh]``). Equal to the candidate-major layer
        (tests/models/test_token_major.py)."""
        h = self.n_heads
        t, c, d = x_ns.shape
        hns = self.ns_norm1(x_ns, token_major=True)

        def heads(y: Tensor) -> Tensor:  # [T, C, d] -> [C, H, T, dh]
            return y.reshape(t, c, h, d // h).permute(1, 2, 0, 3)

        q, k, v = (heads(m(hns, token_major=True)) for m in (self.ns_q, self.ns_k, self.ns_v))
        o = shared_prefix_attention(q, k_s, v_s, length, k, v)  # length >= L means all real
        return self.ns_update(x_ns, o.permute(2, 0, 1, 3).reshape(t, c, d), token_major=True)


class OneTrans(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "onetrans":
            raise ValueError(f"OneTrans needs family 'onetrans', got {cfg.family!r}")
        self.cfg = cfg
        d = cfg.d_model
        hidden = cfg.tokenizer_hidden or 2 * d
        self.embeddings = Embeddings(cfg.schema)
        self.ns_tokenizer = ns_tokenizer_for(cfg, self.embeddings, hidden)
        self.s_tokenizer = STokenizer(self.embeddings, d, hidden)
        self.schedule = cfg.query_schedule()
        self.layers = nn.ModuleList([
            OneTransLayer(cfg, s_queries=i < cfg.n_layers - 1) for i in range(cfg.n_layers)
        ])
        t = cfg.num_ns_tokens
        self.final_norm = RMSNorm(d, tokens=t)
        self.heads = nn.ModuleList([MLP(t * d, cfg.head_hidden or d, 1) for _ in cfg.tasks])

    # -- shared pieces ---------------------------------------------------------------
    def s_tokens(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The S-token stream ``[U, L, d]`` (at most ``s_max_len`` newest) and lengths."""
        b = newest_tokens(batch, self.cfg.schema.s_max_len)
        x = self.s_tokenizer(b)
        return x, batch["s_length"].clamp(min=0, max=x.shape[1])

    def head(self, x_ns: Tensor) -> Tensor:
        z = self.final_norm(x_ns).flatten(1)
        return torch.cat([h(z) for h in self.heads], dim=-1)

    # -- the three entry points --------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Unified forward: logits ``[B, tasks]`` for B (history, candidate) pairs."""
        x_s, length = self.s_tokens(batch)
        x_ns = self.ns_tokenizer(batch)
        for layer, nq in zip(self.layers, self.schedule):
            x_s, x_ns = layer.forward_unified(x_s, x_ns, length, nq)
        return self.head(x_ns)

    def encode_user(self, batch: dict[str, Tensor]) -> UserKV:
        """User encoder: each layer's S-token K/V for U users."""
        x_s, length = self.s_tokens(batch)
        keys, values = [], []
        for layer, nq in zip(self.layers, self.schedule):
            k, v, x_s = layer.encode_s(x_s, length, nq)
            keys.append(k)
            values.append(v)
        return UserKV(keys, values, length)

    def score_candidates(self, user_kv: UserKV, batch: dict[str, Tensor]) -> Tensor:
        """Candidate scorer: logits ``[C, tasks]`` for C candidates of one user."""
        if user_kv.keys[0].shape[0] != 1:
            raise ValueError("score_candidates takes the K/V of exactly one user (U=1)")
        x_ns = self.ns_tokenizer(batch).transpose(0, 1)  # token-major through the layers
        length = user_kv.lengths.reshape(1)
        for layer, k, v in zip(self.layers, user_kv.keys, user_kv.values):
            x_ns = layer.score_ns(x_ns, k, v, length)
        return self.head(x_ns.transpose(0, 1))
