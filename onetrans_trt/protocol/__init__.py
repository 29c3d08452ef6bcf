"""The split protocol: how any ranker tells the toolkit where it splits.

A module follows it with three methods over dicts of named tensors::

    forward(inputs) -> logits [C, tasks]                       # unified, one row per candidate
    encode_user(user_inputs) -> state                          # [U, ...] per named state tensor
    score_candidates(state_of_one_user, candidate_inputs) -> logits [C, tasks]
    unified_state(inputs) -> state per candidate row           # optional: names what moved

plus a :class:`SplitSpec` naming the inputs (side, dtype, dynamic dimensions), the state
(which tensors are per-layer K/V) and the tasks. :func:`check_protocol` proves a module
keeps it; ``export_module`` (``onetrans_trt.export.module``) turns it into a build.

Our own OneTrans and HyFormer follow it through :func:`ours_as_protocol` (their K/V travel
as a ``UserKV``; the adapter names them), so every check runs on them exactly as on a
user's module.
"""

from __future__ import annotations

from typing import Any

from onetrans_trt.protocol.checks import ProtocolError, check_protocol, random_inputs, unified_inputs  # noqa: F401
from onetrans_trt.protocol.spec import InputSpec, SplitSpec, StateSpec  # noqa: F401


def ours_as_protocol(model: Any):
    """Our OneTrans/HyFormer model seen through the protocol: an ``nn.Module`` whose state
    names are ``k<l>``/``v<l>``, ``length`` (the history length) and HyFormer's extras."""
    import torch

    class OursAsProtocol(torch.nn.Module):
        """Our OneTrans/HyFormer model seen through the protocol (state names ``k<l>``/``v<l>``,
        the history length and HyFormer's extras)."""

        def __init__(self, model: Any):
            super().__init__()
            self.model = model.eval()
            self._torch = torch

        def spec(self) -> SplitSpec:
            from onetrans_trt.data.synthetic import synthetic_request
            from onetrans_trt.data.requests import encode_request
            import numpy as np

            schema = self.model.cfg.schema
            hist, ns = encode_request(schema, synthetic_request(schema, np.random.default_rng(0), n_history=1, n_candidates=1))
            inputs = []
            for name, arr in hist.items():
                shape = ["users"] + (["history"] if arr.ndim > 1 else []) + list(arr.shape[2:])
                inputs.append({"name": name, "side": "user", "dtype": str(arr.dtype), "shape": shape,
                               **({"role": "history_length"} if name == "s_length" else {"low": 0, "high": 2})})
            for name, arr in ns.items():
                inputs.append({"name": name, "side": "candidate", "dtype": str(arr.dtype),
                               "shape": ["candidates", *arr.shape[1:]], **({"low": 0, "high": 2} if arr.dtype.kind == "i" else {})})
            with self._torch.no_grad():
                kv = self.model.encode_user({k: self._torch.from_numpy(v) for k, v in hist.items()})
            state = [x for i in range(kv.n_layers) for x in ({"name": f"k{i}", "kind": "key", "layer": i},
                                                               {"name": f"v{i}", "kind": "value", "layer": i})]
            state += [{"name": "length", "kind": "other"}] + [{"name": k, "kind": "other"} for k in kv.extras]
            return SplitSpec.parse({"name": f"{self.model.cfg.family}-{self.model.cfg.preset}", "inputs": inputs,
                                    "state": state, "tasks": list(self.model.cfg.tasks),
                                    "history": {"max": schema.s_max_len, "padding": "left"}})

        def encode_user(self, user: dict) -> dict:
            kv = self.model.encode_user(user)
            out = {}
            for i, (k, v) in enumerate(zip(kv.keys, kv.values)):
                out[f"k{i}"], out[f"v{i}"] = k, v
            out["length"] = kv.lengths
            out.update(kv.extras)
            return out

        def score_candidates(self, state: dict, candidates: dict):
            from onetrans_trt.kv import UserKV

            n = sum(1 for k in state if k.startswith("k") and k[1:].isdigit())
            extras = {k: v for k, v in state.items() if not (k[:1] in "kv" and k[1:].isdigit()) and k != "length"}
            kv = UserKV([state[f"k{i}"] for i in range(n)], [state[f"v{i}"] for i in range(n)], state["length"], extras)
            return self.model.score_candidates(kv, candidates)

        def forward(self, inputs: dict):
            return self.model(inputs)

    return OursAsProtocol(model)
