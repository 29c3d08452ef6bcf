"""Tokenizers: features to S-tokens and NS-tokens.

- :class:`Embeddings`: one ``nn.Embedding`` per schema table (row 0 padding, row 1 OOV),
  shared by NS features and sequence fields that name the same table.
- :class:`AutoSplitNSTokenizer`: one MLP over all NS features, split into ``T`` tokens.
- :class:`GroupNSTokenizer`: one MLP per feature group, one token each.
- :class:`STokenizer`: one MLP per behaviour sequence; the merged stream's type ids select
  which MLP applies at each position, and a type embedding adds the behaviour type
  (timestamp-aware) or the learned [SEP] tokens (timestamp-agnostic).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onetrans_trt.data.schema import FeatureSchema
from onetrans_trt.models.blocks import MLP


def newest_tokens(batch: dict[str, Tensor], n_max: int) -> dict[str, Tensor]:
    """The S-stream tensors cut to their newest ``n_max`` positions (left padding first)."""
    return {k: v[:, -n_max:] for k, v in batch.items() if k.startswith("s_") and k != "s_length"}


class Embeddings(nn.Module):
    def __init__(self, schema: FeatureSchema):
        super().__init__()
        self.schema = schema
        self.tables = nn.ModuleDict({
            name: nn.Embedding(t.rows, t.dim, padding_idx=0) for name, t in schema.tables.items()
        })
        for emb in self.tables.values():
            nn.init.normal_(emb.weight, std=0.05)
            with torch.no_grad():
                emb.weight[0].zero_()

    def ns_feature(self, name: str, x: Tensor) -> Tensor:
        """One NS feature's vector ``[B, width]``."""
        f = next(f for f in self.schema.features if f.name == name)
        if f.kind == "dense":
            return x
        e = self.tables[f.table](x)
        if f.kind == "categorical":
            return e
        present = (x != 0).to(e.dtype).unsqueeze(-1)  # multi-hot: mean of present values
        return (e * present).sum(dim=1) / present.sum(dim=1).clamp(min=1.0)

    def ns_width(self, name: str) -> int:
        f = next(f for f in self.schema.features if f.name == name)
        return f.dim if f.kind == "dense" else self.schema.tables[f.table].dim


class _UsesEmbeddings(nn.Module):
    """Holds the model's shared :class:`Embeddings` without registering it as a child,
    so each table appears once in the state dict (under ``embeddings.``)."""

    def __init__(self, emb: Embeddings):
        super().__init__()
        self._emb = [emb]

    @property
    def emb(self) -> Embeddings:
        return self._emb[0]


class AutoSplitNSTokenizer(_UsesEmbeddings):
    def __init__(self, emb: Embeddings, d_model: int, n_tokens: int, hidden: int):
        super().__init__(emb)
        self.n_tokens, self.d_model = n_tokens, d_model
        self.names = [f.name for f in emb.schema.features]
        width = sum(emb.ns_width(n) for n in self.names)
        self.mlp = MLP(width, hidden, n_tokens * d_model)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        x = torch.cat([self.emb.ns_feature(n, batch[f"ns_{n}"]) for n in self.names], dim=-1)
        return self.mlp(x).reshape(x.shape[0], self.n_tokens, self.d_model)


class GroupNSTokenizer(_UsesEmbeddings):
    def __init__(self, emb: Embeddings, d_model: int, groups: list[list[str]], hidden: int):
        super().__init__(emb)
        self.groups = groups
        self.mlps = nn.ModuleList([
            MLP(sum(emb.ns_width(n) for n in g), hidden, d_model) for g in groups
        ])

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        toks = []
        for g, mlp in zip(self.groups, self.mlps):
            x = torch.cat([self.emb.ns_feature(n, batch[f"ns_{n}"]) for n in g], dim=-1)
            toks.append(mlp(x))
        return torch.stack(toks, dim=1)


class STokenizer(_UsesEmbeddings):
    def __init__(self, emb: Embeddings, d_model: int, hidden: int):
        super().__init__(emb)
        schema = emb.schema
        self.schema = schema
        self.mlps = nn.ModuleList([
            MLP(sum(schema.tables[t].dim for t in s.fields.values()), hidden, d_model)
            for s in schema.sequences
        ])
        k = schema.num_sequences
        # rows: 0 padding, 1..K behaviour types, K+1..2K the [SEP] after sequence k
        self.type_emb = nn.Embedding(2 * k + 1, d_model, padding_idx=0)
        nn.init.normal_(self.type_emb.weight, std=0.05)
        with torch.no_grad():
            self.type_emb.weight[0].zero_()

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        types = batch["s_type"]
        fields = {f: self.emb.tables[t](batch[f"s_{f}"]) for f, t in self.schema.seq_fields.items()}
        out = self.type_emb(types)
        for k, (seq, mlp) in enumerate(zip(self.schema.sequences, self.mlps)):
            x = torch.cat([fields[f] for f in seq.fields], dim=-1)
            out = out + (types == k + 1).to(out.dtype).unsqueeze(-1) * mlp(x)
        return out

    def sequence(self, j: int, ids: dict[str, Tensor]) -> Tensor:
        """Sequence ``j``'s events alone (``ids``: its own fields, ``[U, W]``): ``[U, W, d]``, what
        :meth:`forward` gives those events in a merged stream (its type row plus its MLP; adding
        the other sequences' masked-out zeros changes no bit)."""
        seq = self.schema.sequences[j]
        x = torch.cat([self.emb.tables[t](ids[f]) for f, t in seq.fields.items()], dim=-1)
        return self.type_emb.weight[j + 1] + self.mlps[j](x)


def ns_tokenizer_for(cfg, emb: Embeddings, hidden: int) -> nn.Module:
    """The NS tokenizer a model config asks for (auto-split or group-wise)."""
    if cfg.ns_tokenizer == "auto_split":
        return AutoSplitNSTokenizer(emb, cfg.d_model, cfg.ns_tokens, hidden)
    return GroupNSTokenizer(emb, cfg.d_model, cfg.resolved_ns_groups(), hidden)
