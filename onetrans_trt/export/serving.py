"""The serving graph that ``export`` traces.

``ServingGraph`` computes exactly what serving computes for one request: the user
encoder over the history, then the candidate scorer over C candidates against the
encoder's K/V. Each layer's S-token K and V are also returned as graph outputs named
``user_k_<l>`` / ``user_v_<l>``: the names are the marks the *split at K/V* pass cuts at.

The history side is batched over users (``U``); the scorer takes the first user's K/V
(``[0:1]``), so the cut gives a user encoder batched over users and a scorer for one user.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onetrans_trt.kv import UserKV, kv_names, state_arrays


def history_input_names(model: nn.Module) -> list[str]:
    """OneTrans reads the merged stream (``s_type``, ``s_<field>`` ``[U, L]``, ``s_length``);
    HyFormer each sequence on its own (``s<j>_<field>`` ``[U, W_j]``, ``s<j>_length``: its
    encoders run at that sequence's own length; a merged request is split on the host by
    :func:`~onetrans_trt.data.requests.history_feeds`)."""
    if model.cfg.family == "hyformer":
        from onetrans_trt.data.requests import sequence_input_names

        return sequence_input_names(model.cfg.schema)
    return ["s_type", *[f"s_{f}" for f in model.cfg.schema.seq_fields], "s_length"]


def ns_input_names(model: nn.Module) -> list[str]:
    return [f"ns_{f.name}" for f in model.cfg.schema.features]


def kv_output_names(n_layers: int) -> list[str]:
    return kv_names(n_layers)


def state_output_names(cfg) -> list[str]:
    """Everything the user encoder hands the candidate scorer, by graph name."""
    if cfg.family == "hyformer":
        from onetrans_trt.models.hyformer import SEQ_LENGTH, SEQ_POOL

        return kv_names(cfg.n_layers * cfg.schema.num_sequences) + [f"user_{SEQ_LENGTH}", f"user_{SEQ_POOL}"]
    return kv_names(cfg.n_layers)


def _named_forward(module: nn.Module, names: list[str]) -> None:
    """Give ``module.forward`` one explicit positional parameter per input name.

    ``torch.export`` maps ``dynamic_shapes`` to parameters by name; a ``*tensors``
    signature cannot carry one spec per tensor.
    """
    params = ", ".join(names)
    ns: dict = {}
    exec(f"def forward(self, {params}):\n    return self._forward(({params},))\n", ns)  # noqa: S102
    module.forward = ns["forward"].__get__(module)


class ServingGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.hist_names = history_input_names(model)
        self.ns_names = ns_input_names(model)
        _named_forward(self, self.input_names)

    @property
    def input_names(self) -> list[str]:
        return self.hist_names + self.ns_names

    @property
    def output_names(self) -> list[str]:
        return ["logits", "probs", *state_output_names(self.model.cfg)]

    def _forward(self, tensors: tuple[Tensor, ...]):
        n_hist = len(self.hist_names)
        hist = dict(zip(self.hist_names, tensors[:n_hist]))
        ns = dict(zip(self.ns_names, tensors[n_hist:]))
        kv = self.model.encode_user(hist)
        # The scorer reads the raw s_length (a length >= the K/V's is "all real"), so it
        # depends on no shape of the history inputs and the cut leaves no S side in it.
        # (HyFormer's scorer reads its per-sequence lengths from the state, not this one)
        length = hist["s_length"] if "s_length" in hist else kv.lengths
        first = UserKV([k[0:1] for k in kv.keys], [v[0:1] for v in kv.values], length[0:1],
                       {k: v[0:1] for k, v in kv.extras.items()})
        logits = self.model.score_candidates(first, ns)
        state = state_arrays(kv)
        return (logits, torch.sigmoid(logits), *[state[n] for n in state_output_names(self.model.cfg)])


class UnifiedGraph(nn.Module):
    """The naive model as a user would export it: the whole sequence per candidate."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.names = history_input_names(model) + ns_input_names(model)
        _named_forward(self, self.names)

    @property
    def input_names(self) -> list[str]:
        return self.names

    @property
    def output_names(self) -> list[str]:
        return ["logits", "probs"]

    def _forward(self, tensors: tuple[Tensor, ...]):
        logits = self.model(dict(zip(self.names, tensors)))
        return logits, torch.sigmoid(logits)
