"""Token-wise building blocks with mixed parameterization.

S-tokens share one set of weights (plain ``nn.Linear``); each NS-token position has its
own (``MixedLinear``: weight ``[T, in, out]``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm; with ``tokens`` set, each token position has its own gain."""

    def __init__(self, dim: int, tokens: int | None = None, eps: float = 1e-6):
        super().__init__()
        shape = (dim,) if tokens is None else (tokens, dim)
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: Tensor, token_major: bool = False) -> Tensor:
        """``token_major``: ``x`` is ``[T, B, dim]`` (token position first; per-token gains
        broadcast over B). A flag of ``forward``, not another method, so that module hooks and
        the exporter's module scopes see the call (validate's first divergence names modules)."""
        w = self.weight.unsqueeze(1) if token_major and self.weight.dim() == 2 else self.weight
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * w


class MixedLinear(nn.Module):
    """A linear map per token position: ``[B, T, in] -> [B, T, out]``."""

    def __init__(self, tokens: int, d_in: int, d_out: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(tokens, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(tokens, d_out)) if bias else None
        bound = 1.0 / math.sqrt(d_in)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor, token_major: bool = False) -> Tensor:
        """``token_major``: ``x`` is ``[T, B, in]`` -> ``[T, B, out]``, the batched product as it
        is, no transposes (the candidate scorer keeps its NS stream token-major)."""
        if token_major:
            y = torch.matmul(x, self.weight)
            return y if self.bias is None else y + self.bias.unsqueeze(1)
        y = torch.matmul(x.transpose(0, 1), self.weight).transpose(0, 1)  # [T,B,in]@[T,in,out]
        return y if self.bias is None else y + self.bias


class FFN(nn.Module):
    """Position-wise FFN (GELU); shared when ``tokens`` is None, else per NS-token."""

    def __init__(self, dim: int, hidden: int, tokens: int | None = None):
        super().__init__()
        if tokens is None:
            self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        else:
            self.up = MixedLinear(tokens, dim, hidden, bias=True)
            self.down = MixedLinear(tokens, hidden, dim, bias=True)

    def forward(self, x: Tensor, token_major: bool = False) -> Tensor:
        """``token_major``: a per-NS-token FFN on ``[T, B, dim]`` (see :class:`MixedLinear`)."""
        if token_major and isinstance(self.up, MixedLinear):  # shared weights need no layout
            return self.down(nn.functional.gelu(self.up(x, token_major=True)), token_major=True)
        return self.down(nn.functional.gelu(self.up(x)))


class MLP(nn.Module):
    """Two-layer MLP used by tokenizers and heads."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
