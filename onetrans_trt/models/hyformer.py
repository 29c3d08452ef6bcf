"""HyFormer (arXiv 2601.12681): global queries decode per-layer sequence K/V, then boost.

Per behaviour sequence ``j`` (kept apart, never merged: HyFormer's multi-sequence
setting), ``N`` global query tokens come from the NS tokens and the sequences' mean pools
(``hy_query_gen``: ``all_pools``, the paper's: N FFNs over ``concat(NS tokens, every
sequence's pool)``, one query each; ``own_pool``: one FFN over ``concat(NS tokens, pool of
sequence j)`` giving all N). Each layer ``l``:

1. **sequence encoding**: sequence j's tokens pass one encoder layer (``transformer``:
   self-attention + FFN; ``longer``: the newest ``longer_window`` tokens attend the whole
   sequence, LONGER-style, and only they go on; ``swiglu``: a SwiGLU FFN, no attention;
   ``seq_attention``: ``bidirectional``, the paper's full self-attention, or ``causal``),
   then are projected to that layer's K/V (``hy_kv_norm``: through an RMSNorm first);
2. **query decoding**: sequence j's queries cross-attend its K/V, multi-head (``hy_sink``:
   plus one learned sink key/value per head; without it an empty sequence decodes to
   nothing, the softmax over no key is defined as zero, never NaN);
3. **query boosting**: ``[queries of every sequence ; NS tokens]`` (T tokens) are mixed
   RankMixer-style (each token cut into T chunks, chunk h of every token regrouped into
   token h), a per-token FFN refines them, and a residual adds the input back.

Task heads read the final queries and NS tokens (``hy_head_input``: ``queries_ns``, the
paper's; ``queries``: the queries only). The paper's form is the default; the first
release's (sink, K/V norm, causal, ``own_pool``, ``queries``) stays an option and is what a
config without these keys loads as (:data:`~onetrans_trt.models.config.HYFORMER_WAVE1`).

The sequence side never sees a candidate, so the split is exact: ``encode_user`` returns
each (layer, sequence) K/V plus each sequence's real length and mean-pooled tokens
(:class:`~onetrans_trt.kv.UserKV` ``extras``), and ``score_candidates`` runs query
generation, decoding and boosting for C candidates against that one cached state.

Inputs are the same merged S-token stream as OneTrans (``s_type`` says which sequence
each event belongs to); the model lays each sequence out on its own, left-padded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from onetrans_trt.kv import UserKV
from onetrans_trt.models.attention import (
    _real_prefix_keys,
    bidirectional_attention,
    merge_heads,
    prefix_key_mask,
    shared_decode_attention,
    split_heads,
    tail_causal_attention,
)
from onetrans_trt.models.blocks import FFN, MLP, RMSNorm
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.tokenizers import Embeddings, STokenizer, newest_tokens, ns_tokenizer_for

SEQ_LENGTH = "seq_length"  # extras: [U, J] real tokens per sequence
SEQ_POOL = "seq_pool"  # extras: [U, J, d] mean of each sequence's real tokens


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class SequenceEncoderLayer(nn.Module):
    """One layer of one sequence's encoder, and its projection to that layer's K/V."""

    def __init__(self, cfg: ModelConfig, j: int = 0):
        super().__init__()
        d, f = cfg.d_model, cfg.d_model * cfg.ffn_mult
        spec = cfg.hy_seq(j)  # sequence j's own encoder and window
        self.kind, self.window, self.n_heads = spec["encoder"], spec["window"], cfg.n_heads
        self.causal = cfg.seq_attention == "causal"
        self.norm1 = RMSNorm(d)
        if self.kind == "swiglu":
            self.ffn: nn.Module = SwiGLU(d, f)
        else:
            self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
            self.norm2 = RMSNorm(d)
            self.ffn = FFN(d, f)
        self.kv_norm = RMSNorm(d) if cfg.hy_kv_norm else nn.Identity()
        self.to_k = nn.Linear(d, d, bias=False)
        self.to_v = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``[U, n, d]`` left-padded with ``valid`` real tokens; returns the layer's
        output tokens (the newest ``window`` for LONGER) and their K/V ``[U, H, n', dh]``."""
        return self.run(x, valid)[:3]

    def run(self, x: Tensor, valid: Tensor, past: tuple[Tensor, Tensor] | None = None):
        """:meth:`forward` and the self-attention's own K/V ``[U, H, n_keys, dh]`` (None for
        ``swiglu``): ``(out, k, v, self_k, self_v)``.

        ``past``: self-attention K/V of cached tokens before ``x`` (all real, no padding; then
        ``x`` must be real too): the keys are ``past ++ x``, so the new tokens' outputs equal
        those of a full pass over the longer sequence (the append path,
        :mod:`onetrans_trt.models.append_hyformer`)."""
        h = self.n_heads
        if self.kind == "swiglu":
            out = x + self.ffn(self.norm1(x))
            sk = sv = None
        else:
            hx = self.norm1(x)
            tail = x if self.kind == "transformer" else x[:, -self.window:]
            q = split_heads(self.q(hx if self.kind == "transformer" else hx[:, -self.window:]), h)
            sk, sv = split_heads(self.k(hx), h), split_heads(self.v(hx), h)
            if past is not None:
                if not self.causal:
                    raise ValueError("bidirectional self-attention has no append: new tokens change every "
                                     "cached token's output")
                sk, sv = torch.cat([past[0], sk], dim=2), torch.cat([past[1], sv], dim=2)
            attend = tail_causal_attention if self.causal else bidirectional_attention
            z = tail + self.o(merge_heads(attend(q, sk, sv, valid.clamp(max=sk.shape[2]))))
            out = z + self.ffn(self.norm2(z))
        hk = self.kv_norm(out)
        return out, split_heads(self.to_k(hk), h), split_heads(self.to_v(hk), h), sk, sv


def decode_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, sink_k: Tensor | None,
                     sink_v: Tensor | None, shared: bool) -> Tensor:
    """Cross-attention of queries over one sequence's K/V (plus a learned sink, if given).

    q ``[B, H, N, dh]``; k/v ``[B, H, n, dh]`` left-padded with ``valid`` ``[B]`` (a count
    >= n means all real); sink_k/sink_v ``[H, dh]`` or None. Without a sink, a row with no
    real key (an empty sequence) attends nothing: its output is 0 (the softmax's shift
    comes from the real keys only, so no NaN arises, forward or backward). ``shared``: one
    K/V ``[1, ...]`` for all B rows (the candidate scorer): the queries of every row are
    folded into one batch, so the K/V are read once and never copied per candidate.
    """
    if shared and sink_k is None:  # the op SharedDecodeAttention (fuse-attention finds it in the scorer)
        return shared_decode_attention(q, k, v, valid)
    b, h, nq, dh = q.shape
    scale = 1.0 / math.sqrt(dh)
    qq = q.transpose(0, 1).reshape(1, h, b * nq, dh) if shared else q
    if sink_k is None and k.shape[2] == 0:  # no key at all (an appended state's empty sequence)
        return torch.zeros_like(q)
    s = torch.matmul(qq, k.transpose(-1, -2)) * scale  # [1|B, H, rows, n]
    if shared:
        real = _real_prefix_keys(k, valid)  # [1, 1, 1, n]
    else:
        real = prefix_key_mask(k.shape[2], valid.clamp(max=k.shape[2])).reshape(k.shape[0], 1, 1, -1)
    s = s.masked_fill(~real, float("-inf"))
    if sink_k is None:
        m = s.amax(dim=-1, keepdim=True)  # -inf on a row with no real key
        # 0 at every masked key by the mask itself, not by exp(-inf): an FP16 graph stores -inf as -1e4
        p = torch.where(real, torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m)), torch.zeros_like(s))
        den = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, v) / torch.where(den > 0, den, torch.ones_like(den))
    else:
        s0 = (qq * sink_k.reshape(1, h, 1, dh)).sum(-1, keepdim=True) * scale  # the sink's score
        p = torch.softmax(torch.cat([s, s0], dim=-1), dim=-1)
        o = torch.matmul(p[..., :-1], v) + p[..., -1:] * sink_v.reshape(1, h, 1, dh)
    return o.reshape(h, b, nq, dh).transpose(0, 1) if shared else o


class QueryDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        self.n_heads = h
        self.norm = RMSNorm(d)
        self.q, self.o = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        if cfg.hy_sink:
            self.sink_k = nn.Parameter(torch.randn(h, d // h) * 0.02)
            self.sink_v = nn.Parameter(torch.zeros(h, d // h))
        else:
            self.sink_k = self.sink_v = None

    def forward(self, queries: Tensor, k: Tensor, v: Tensor, valid: Tensor, shared: bool) -> Tensor:
        q = split_heads(self.q(self.norm(queries)), self.n_heads)
        return queries + self.o(merge_heads(decode_attention(q, k, v, valid, self.sink_k, self.sink_v, shared)))


class QueryBoost(nn.Module):
    """RankMixer-style token mixing of T tokens, per-token FFN, residual."""

    def __init__(self, cfg: ModelConfig, tokens: int):
        super().__init__()
        self.t = tokens
        self.norm = RMSNorm(cfg.d_model, tokens=tokens)
        self.ffn = FFN(cfg.d_model, cfg.d_model * cfg.ffn_mult, tokens=tokens)

    def forward(self, z: Tensor) -> Tensor:
        b, t, d = z.shape
        mixed = self.norm(z).reshape(b, t, t, d // t).transpose(1, 2).reshape(b, t, d)
        return z + self.ffn(mixed)


class HyFormer(nn.Module):
    # training lays each sequence out at the batch's real counts (False: at the static serving layout,
    # as the first release did; tools/train_step_time.py times the two side by side)
    fit_training_layout: bool = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "hyformer":
            raise ValueError(f"HyFormer needs family 'hyformer', got {cfg.family!r}")
        self.cfg = cfg
        d = cfg.d_model
        hidden = cfg.tokenizer_hidden or 2 * d
        self.n_seq = cfg.schema.num_sequences
        self.n_qs = [cfg.hy_seq(j)["queries"] for j in range(self.n_seq)]  # N_j global queries of sequence j
        self.caps = [cfg.hy_seq(j)["max_len"] for j in range(self.n_seq)]
        self.embeddings = Embeddings(cfg.schema)
        self.ns_tokenizer = ns_tokenizer_for(cfg, self.embeddings, hidden)
        self.s_tokenizer = STokenizer(self.embeddings, d, hidden)
        m = cfg.num_ns_tokens
        self.query_gen_kind = cfg.hy_query_gen
        if cfg.hy_query_gen == "own_pool":
            self.query_gen = nn.ModuleList([MLP(m * d + d, hidden, n * d) for n in self.n_qs])
        else:  # all_pools: sequence j's query i from its own FFN over NS tokens and every pool
            self.query_gen = nn.ModuleList([
                nn.ModuleList([MLP(m * d + self.n_seq * d, hidden, d) for _ in range(n)]) for n in self.n_qs])
        self.encoders = nn.ModuleList([
            nn.ModuleList([SequenceEncoderLayer(cfg, j) for j in range(self.n_seq)]) for _ in range(cfg.n_layers)])
        self.decoders = nn.ModuleList([
            nn.ModuleList([QueryDecoder(cfg) for _ in range(self.n_seq)]) for _ in range(cfg.n_layers)])
        nq = sum(self.n_qs)
        self.boosts = nn.ModuleList([QueryBoost(cfg, nq + m) for _ in range(cfg.n_layers)])
        self.heads_read_ns = cfg.hy_head_input == "queries_ns"
        read = nq + (m if self.heads_read_ns else 0)
        self.final_norm = RMSNorm(d, tokens=read)
        self.heads = nn.ModuleList([MLP(read * d, cfg.head_hidden or d, 1) for _ in cfg.tasks])

    # -- user side -----------------------------------------------------------------------
    def sequences(self, batch: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Each sequence on its own: ``([U, W_j, d]`` tokens left-padded, ``[U]`` real count).
        ``W_j``: the stream's width, or sequence j's ``max_len`` (its newest events kept).

        The batch is either the merged stream (``s_type``, ``s_<field>``, ``s_length``: laid out
        here) or each sequence's own inputs (``s<j>_<field>`` ``[U, W_j]`` left-padded and
        ``s<j>_length``, :func:`~onetrans_trt.data.requests.split_sequences`; what the exported
        graphs read): the same tokens either way."""
        if f"s0_length" in batch:
            return self._own_sequences(batch)
        b = newest_tokens(batch, self.cfg.schema.s_max_len)
        x = self.s_tokenizer(b)
        types = b["s_type"]
        n = x.shape[1]
        real = prefix_key_mask(n, batch["s_length"].clamp(min=0, max=n))
        pos = torch.arange(n, device=x.device)
        # training (eager) follows the real token counts: sequence j laid out at the batch's most kept
        # events, not the stream's width (padding is masked, so the same numbers, less work); a traced
        # or exported graph keeps the static layout (min(stream, max_len)) the serving graphs declare
        fit = self.fit_training_layout and self.training and not (torch.compiler.is_compiling()
                                                                  or torch.jit.is_tracing())
        out = []
        for j in range(self.n_seq):
            mine = (types == j + 1) & real
            n_mine = mine.sum(dim=1)
            width = n if self.caps[j] is None else torch.sym_min(n, self.caps[j])  # no guard on a traced n
            if fit:
                width = max(1, min(int(width), int(n_mine.max())))
            rank = torch.cumsum(mine.to(torch.int64), dim=1) - 1
            drop = (n_mine - width).clamp(min=0)  # the oldest events past sequence j's cap
            keep = mine & (rank >= drop.unsqueeze(1))
            count = keep.sum(dim=1)
            # sequence j's kept events go, in order, to the last `count` of its `width` slots; every
            # other event to a discard slot past the end (all targets distinct, so the scatter is exact)
            dest = torch.where(keep, (width - count - drop).unsqueeze(1) + rank, pos + width)
            buf = x.new_zeros(x.shape[0], width + n, x.shape[2])
            xj = buf.scatter(1, dest.unsqueeze(-1).expand(-1, -1, x.shape[2]), x)[:, :width]
            out.append((xj, count))  # padding slots hold zeros, not the other sequences' events
        return out

    def _own_sequences(self, batch: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        out = []
        for j, seq in enumerate(self.cfg.schema.sequences):
            x = self.s_tokenizer.sequence(j, {f: batch[f"s{j}_{f}"] for f in seq.fields})
            n = x.shape[1]
            width = n if self.caps[j] is None else torch.sym_min(n, self.caps[j])
            x = x.narrow(1, n - width, width)  # the newest max_len events (a size the exporter can read)
            count = torch.clamp(batch[f"s{j}_length"].reshape(-1), min=0, max=x.shape[1])
            # padding slots hold zeros, as the merged stream's layout leaves them
            out.append((x * prefix_key_mask(x.shape[1], count).to(x.dtype).unsqueeze(-1), count))
        return out

    def encode_user(self, batch: dict[str, Tensor], self_kv: bool = False) -> UserKV:
        """Every (layer, sequence) K/V, flattened as ``keys[l * J + j]``; extras: each
        sequence's real length and mean-pooled tokens (the query generator's summary).
        ``self_kv``: also each attention layer's self-attention K/V (extras ``enc_k_<slot>`` /
        ``enc_v_<slot>``), what an append needs (:mod:`onetrans_trt.models.append_hyformer`)."""
        seqs = self.sequences(batch)
        pools, lengths = [], []
        for x, n_real in seqs:
            w = prefix_key_mask(x.shape[1], n_real).to(x.dtype).unsqueeze(-1)
            pools.append((x * w).sum(dim=1) / n_real.clamp(min=1).to(x.dtype).unsqueeze(-1))
            lengths.append(n_real)
        keys, values, enc = [], [], {}
        xs = [x for x, _ in seqs]
        for lay, layer in enumerate(self.encoders):
            for j, e in enumerate(layer):
                xs[j], k, v, sk, sv = e.run(xs[j], lengths[j])
                keys.append(k)
                values.append(v)
                if self_kv and sk is not None:
                    slot = lay * len(seqs) + j
                    enc[f"enc_k_{slot}"], enc[f"enc_v_{slot}"] = sk, sv
        n_seq = torch.stack(lengths, dim=1)
        total = batch["s_length"] if "s_length" in batch else n_seq.sum(dim=1)
        return UserKV(keys, values, total,
                      {SEQ_LENGTH: n_seq, SEQ_POOL: torch.stack(pools, dim=1), **enc})

    # -- candidate side -------------------------------------------------------------------
    def score_candidates(self, user_kv: UserKV, batch: dict[str, Tensor]) -> Tensor:
        """Logits ``[C, tasks]`` for C candidates of one user (``user_kv`` with U=1)."""
        if user_kv.keys[0].shape[0] != 1:
            raise ValueError("score_candidates takes the state of exactly one user (U=1)")
        return self._candidates(user_kv, batch, shared=True)

    def _candidates(self, kv: UserKV, batch: dict[str, Tensor], shared: bool) -> Tensor:
        x_ns = self.ns_tokenizer(batch)  # [C, M, d]
        c, d = x_ns.shape[0], self.cfg.d_model
        flat = x_ns.flatten(1)
        pool, lengths = kv.extras[SEQ_POOL], kv.extras[SEQ_LENGTH]  # [1|C, J, d], [1|C, J]
        if self.query_gen_kind == "own_pool":
            queries = [gen(torch.cat([flat, pool[:, j].expand(c, d)], dim=-1)).reshape(c, self.n_qs[j], d)
                       for j, gen in enumerate(self.query_gen)]
        else:
            info = torch.cat([flat, pool.flatten(1).expand(c, self.n_seq * d)], dim=-1)  # the paper's Global Info
            queries = [torch.stack([f(info) for f in gens], dim=1) for gens in self.query_gen]
        for l, (decs, boost) in enumerate(zip(self.decoders, self.boosts)):
            for j, dec in enumerate(decs):
                queries[j] = dec(queries[j], kv.keys[l * self.n_seq + j], kv.values[l * self.n_seq + j],
                                 lengths[:, j], shared)
            z = boost(torch.cat([*queries, x_ns], dim=1))
            nq = sum(self.n_qs)
            queries = list(z[:, :nq].split(self.n_qs, dim=1))
            x_ns = z[:, nq:]
        zq = self.final_norm(torch.cat([*queries, x_ns] if self.heads_read_ns else queries, dim=1)).flatten(1)
        return torch.cat([h(zq) for h in self.heads], dim=-1)

    # -- unified ---------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits ``[B, tasks]`` for B (history, candidate) pairs, each with its own state."""
        return self._candidates(self.encode_user(batch), batch, shared=False)
