"""Encode-then-interact baseline (DIN-style), as production rankers commonly do.

The history is pooled by target attention against the candidate (an MLP over
``[h, q, h - q, h * q]`` per event, softmax over real events), then one MLP reads all NS
features, the pooled history and the mean history. Same inputs as OneTrans, so the two
train and serve through the same code; it has no user/candidate split.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onetrans_trt.models.attention import NEG_INF, prefix_key_mask
from onetrans_trt.models.blocks import MLP
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.tokenizers import Embeddings, STokenizer, newest_tokens


class Baseline(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "baseline":
            raise ValueError(f"Baseline needs family 'baseline', got {cfg.family!r}")
        self.cfg = cfg
        d = cfg.d_model
        schema = cfg.schema
        self.embeddings = Embeddings(schema)
        self.s_tokenizer = STokenizer(self.embeddings, d, 2 * d)
        self.ns_names = [f.name for f in schema.features]
        item_names = [f.name for f in schema.features_in("item")] or self.ns_names
        self.item_names = item_names
        self.query = nn.Linear(sum(self.embeddings.ns_width(n) for n in item_names), d)
        self.att = MLP(4 * d, d, 1)
        width = sum(self.embeddings.ns_width(n) for n in self.ns_names) + 2 * d
        self.tower = nn.Sequential(nn.Linear(width, 4 * d), nn.GELU(), nn.Linear(4 * d, 2 * d), nn.GELU(),
                                   nn.Linear(2 * d, len(cfg.tasks)))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        s = newest_tokens(batch, self.cfg.schema.s_max_len)
        h = self.s_tokenizer(s)  # [B, L, d]
        n = h.shape[1]
        real = prefix_key_mask(n, batch["s_length"].clamp(min=0, max=n))  # [B, L]
        feats = {name: self.embeddings.ns_feature(name, batch[f"ns_{name}"]) for name in self.ns_names}
        q = self.query(torch.cat([feats[name] for name in self.item_names], dim=-1)).unsqueeze(1)
        qe = q.expand_as(h)
        logits = self.att(torch.cat([h, qe, h - qe, h * qe], dim=-1)).squeeze(-1)
        w = torch.softmax(logits.masked_fill(~real, NEG_INF), dim=-1)
        w = torch.nan_to_num(w, nan=0.0)  # empty history: no events to pool
        pooled = (w.unsqueeze(-1) * h).sum(dim=1)
        realf = real.to(h.dtype).unsqueeze(-1)
        mean = (h * realf).sum(dim=1) / realf.sum(dim=1).clamp(min=1.0)
        x = torch.cat([*feats.values(), pooled, mean], dim=-1)
        return self.tower(x)
