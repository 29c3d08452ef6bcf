"""Append instead of re-encode, in serving: a user's next request extends the stored state.

A :class:`~onetrans_trt.runtime.ranker.Ranker` made with ``store=`` and ``append=True``
keeps, next to each user's states (keyed by history fingerprint), the user's **latest
history** (the encoded history tensors, under the fingerprint ``"latest"``). When a request
misses (its history's state is not stored), the latest history and its state are looked up:
if the new history extends it exactly (:func:`onetrans_trt.models.append.plan_append`,
:func:`onetrans_trt.models.append_hyformer.plan_append`), only the new events are encoded
against the stored K/V; else the whole history is encoded. Either way the result says which
and why (``RankResult.user_state``), and the new state and latest history are stored.

Appenders (one per backend kind):

- :class:`TorchAppender` (``torch-split``): OneTrans :func:`~onetrans_trt.models.append.append_user`,
  HyFormer :func:`~onetrans_trt.models.append_hyformer.append_user` (its states then carry the
  self-attention K/V: :func:`~onetrans_trt.models.append_hyformer.encode_appendable`);
- :class:`OrtAppender` (``ort``): through ``BUILD/user_encoder_append.onnx`` (``export
  --append``), the host deciding first as always; HyFormer's first state of a user is every
  event appended to the empty state (the same graph: the full encode plus the self-attention
  K/V that ``user_encoder.onnx`` does not output).

A store that is down or a state that does not decode never changes a score: the request
encodes its whole history, as without ``append``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from onetrans_trt.errors import InputError
from onetrans_trt.kv import UserKV

LATEST = "latest"  # the fingerprint under which a user's latest history is stored


def _np_state(kv: UserKV) -> UserKV:
    from onetrans_trt.runtime.state import to_numpy

    return UserKV([to_numpy(k) for k in kv.keys], [to_numpy(v) for v in kv.values],
                  None if kv.lengths is None else to_numpy(kv.lengths), {k: to_numpy(v) for k, v in kv.extras.items()})


def _torch_state(kv: UserKV) -> UserKV:
    import torch

    def t(x):
        return torch.from_numpy(np.ascontiguousarray(x))

    return UserKV([t(k) for k in kv.keys], [t(v) for v in kv.values], t(np.asarray(kv.lengths)),
                  {k: t(v) for k, v in kv.extras.items()})


def plan(cfg, old_hist: dict[str, np.ndarray], new_hist: dict[str, np.ndarray]):
    """The family's :class:`~onetrans_trt.models.append.Decision` for ``new_hist`` after ``old_hist``."""
    if cfg.family == "hyformer":
        from onetrans_trt.models.append_hyformer import plan_append

        return plan_append(cfg, old_hist, new_hist)
    from onetrans_trt.models.append import plan_append

    return plan_append(cfg, old_hist, new_hist)


def _stream_len(cfg, hist) -> int:
    from onetrans_trt.models.append import _stream

    return len(_stream(cfg.schema, hist, "history")["s_type"])


class TorchAppender:
    """Appends with the eager model of a ``torch-split`` backend."""

    def __init__(self, model: Any):
        from onetrans_trt.models.append import can_append

        self.model, self.cfg = model, model.cfg
        if self.cfg.family == "onetrans":
            ok, why = can_append(self.cfg, 0, 1)
            if not ok:
                raise InputError(f"append: {why}")
        elif self.cfg.family != "hyformer":
            raise InputError(f"append: family {self.cfg.family!r} has no user state to extend")
        else:
            _check_hyformer(self.cfg)

    def encode(self, hist: dict[str, np.ndarray]) -> UserKV | None:
        """The appendable state of ``hist`` (None: the backend's own encode is appendable)."""
        if self.cfg.family != "hyformer":
            return None
        import torch

        from onetrans_trt.models.append_hyformer import encode_appendable

        with torch.no_grad():
            return _np_state(encode_appendable(self.model, {k: torch.from_numpy(v) for k, v in hist.items()}))

    def append(self, kv_old: UserKV, decision, old_hist, new_hist) -> UserKV:
        import torch

        with torch.no_grad():
            if self.cfg.family == "hyformer":
                from onetrans_trt.models.append_hyformer import append_user

                return _np_state(append_user(self.model, _torch_state(kv_old), decision.tokens,
                                             s_length=torch.from_numpy(np.asarray(new_hist["s_length"]))))
            from onetrans_trt.models.append import append_user

            return _np_state(append_user(self.model, _torch_state(kv_old), decision.tokens))

    def fits(self, kv_old: UserKV, old_hist) -> str:
        """Why ``kv_old`` is not the state of ``old_hist`` ('' when it is)."""
        return _fits(self.cfg, kv_old, old_hist)


def _check_hyformer(cfg) -> None:
    from onetrans_trt.models.append_hyformer import appendable

    ok, why = appendable(cfg)
    if not ok:
        raise InputError(f"append: {why}")


def _fits(cfg, kv_old: UserKV, old_hist) -> str:
    if cfg.family == "hyformer":
        from onetrans_trt.models.append_hyformer import enc_names, seq_caps, sequence_tokens
        from onetrans_trt.models.hyformer import SEQ_LENGTH

        have = [len(s["s_type"]) for s in sequence_tokens(cfg.schema, old_hist, caps=seq_caps(cfg))]
        cached = np.asarray(kv_old.extras.get(SEQ_LENGTH, np.zeros((1, 0)))).reshape(-1).tolist()
        if [int(x) for x in cached] != have:
            return f"the stored state holds {cached} tokens per sequence, the latest history {have}"
        if any(n not in kv_old.extras for n in enc_names(cfg)):
            return "the stored state has no self-attention K/V (stored without append)"
        return ""
    n = np.asarray(kv_old.lengths).reshape(-1)
    want = _stream_len(cfg, old_hist)
    if len(n) != 1 or int(n[0]) != want:
        return f"the stored state holds {n.tolist()} S-tokens, the latest history {want}"
    return ""


class OrtAppender:
    """Appends OneTrans states through ``BUILD/user_encoder_append.onnx`` with ONNX Runtime."""

    def __init__(self, build: str | Path, cfg: Any, *, providers: list[str] | None = None,
                 threads: int | None = None):
        from onetrans_trt.export.append import APPEND_GRAPH
        from onetrans_trt.models.append import can_append
        from onetrans_trt.runtime.ort_backend import ort_session

        if cfg.family not in ("onetrans", "hyformer"):
            raise InputError(f"append: family {cfg.family!r} has no user state to extend")
        if cfg.family == "hyformer":
            _check_hyformer(cfg)
        ok, why = can_append(cfg, 0, 1) if cfg.family == "onetrans" else (True, "")
        if not ok:
            raise InputError(f"append: {why}")
        path = Path(build) / APPEND_GRAPH
        if not path.is_file():
            raise InputError(f"{build}: no {APPEND_GRAPH}; run `onetrans-trt export CKPT --out {build} --append` "
                             f"to append users' new events (or drop --append)")
        self.cfg = cfg
        self.session = ort_session(path, providers, threads)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def encode(self, hist):
        """OneTrans: None (the build's encoder state is appendable). HyFormer: every event
        appended to the empty state, which is the full encode with the self-attention K/V
        an append needs (``user_encoder.onnx`` does not output them)."""
        if self.cfg.family != "hyformer":
            return None
        from onetrans_trt.export.append_hyformer import empty_state
        from onetrans_trt.models.append_hyformer import seq_caps, sequence_tokens

        tokens = {str(j): {key: v[None, :] for key, v in s.items()}
                  for j, s in enumerate(sequence_tokens(self.cfg.schema, hist, caps=seq_caps(self.cfg))) if len(s["s_type"])}
        return self._run_hyformer(empty_state(self.cfg), tokens, hist)

    def _run_hyformer(self, kv: UserKV, tokens, hist) -> UserKV:
        from onetrans_trt.export.append_hyformer import append_feeds, appended_state

        outs = self.session.run(self.outputs, append_feeds(kv, tokens, self.cfg))
        return appended_state(dict(zip(self.outputs, outs)), hist["s_length"], self.cfg)

    def append(self, kv_old: UserKV, decision, old_hist, new_hist) -> UserKV:
        if self.cfg.family == "hyformer":
            return self._run_hyformer(kv_old, decision.tokens, new_hist)
        from onetrans_trt.export.append import append_feeds, appended_state

        outs = self.session.run(self.outputs, append_feeds(_np_state(kv_old), decision.tokens, self.cfg))
        return appended_state(dict(zip(self.outputs, outs)))

    def fits(self, kv_old: UserKV, old_hist) -> str:
        return _fits(self.cfg, kv_old, old_hist)


def appender_for(backend: Any, build: str | Path | None = None, cfg: Any = None, **ort_kw: Any):
    """The appender of a split backend (``InputError`` naming why when it has none)."""
    name = getattr(backend, "name", "?")
    if not getattr(backend, "split", False):
        raise InputError(f"append: backend {name!r} keeps no user state; use a split backend")
    if hasattr(backend, "model"):
        return TorchAppender(backend.model)
    if name == "ort" and build is not None and cfg is not None:
        return OrtAppender(build, cfg, **ort_kw)
    raise InputError(f"append: backend {name!r} cannot append yet (use 'ort' with `export --append`, "
                     f"or 'torch-split')")


__all__ = ["LATEST", "OrtAppender", "TorchAppender", "appender_for", "plan"]
