"""The Ranker: requests in, per-task scores out, over any backend.

    ranker = Ranker.load("runs/small", backend="torch-split")
    result = ranker.rank(request)          # a Request or its JSON dict
    result.scores["like"]                  # probabilities, one per candidate

Candidates are scored in chunks of ``chunk_size`` so memory stays bounded for any C.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onetrans_trt.data.requests import Request, RequestLimits, encode_request
from onetrans_trt.data.schema import FeatureSchema
from onetrans_trt.errors import InputError


@dataclass
class RankResult:
    tasks: list[str]
    logits: np.ndarray  # [C, tasks]
    user_key: str | None = None
    truncated: dict[str, Any] | None = None  # what RequestLimits(over_limit="truncate") cut
    user_state: dict[str, Any] | None = None  # with append: where the state came from, and why

    @property
    def probabilities(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits.astype(np.float64)))

    @property
    def scores(self) -> dict[str, list[float]]:
        p = self.probabilities
        return {t: p[:, i].tolist() for i, t in enumerate(self.tasks)}

    def to_json(self) -> dict[str, Any]:
        p = self.probabilities
        order = np.argsort(-p[:, 0], kind="stable").tolist() if len(p) else []
        return {
            "user_key": self.user_key,
            "tasks": self.tasks,
            "scores": self.scores,
            "logits": {t: self.logits[:, i].astype(float).tolist() for i, t in enumerate(self.tasks)},
            "order": order,
            **({"truncated": self.truncated} if self.truncated else {}),
            **({"user_state": self.user_state} if self.user_state else {}),
        }


class Ranker:
    """Requests in, per-task scores out, over one backend; build it with :meth:`Ranker.load`."""

    def __init__(self, schema: FeatureSchema, tasks: list[str], backend: Any, *, chunk_size: int = 512,
                 cache: Any = None, limits: RequestLimits | None = None, store: Any = None,
                 build_hash: str | None = None, family: str = "", append: Any = False):
        """``cache``: a :class:`~onetrans_trt.runtime.cache.UserKVCache` shared across requests
        (split backends only); ``limits``: what a request may hold (defaults: see
        :class:`~onetrans_trt.data.requests.RequestLimits`).

        ``store``: users' states kept across requests and processes, a URL
        (``memory://?max_mb=256``, ``redis://host:6379/0?ttl_s=3600``; see
        :func:`~onetrans_trt.runtime.store.store_from_url`) or a
        :class:`~onetrans_trt.runtime.store.UserStateStore` made for this build (split backends
        only; not with ``cache``). ``build_hash`` names the user encoder the states come from
        (:meth:`load` passes the sha256 of the graph or engine it runs; a torch backend's
        default: :func:`model_hash`); ``family`` is written into each stored state.
        ``encoder_runs`` counts the user-encoder runs of this Ranker.

        ``append`` (with ``store``): a user whose history grew since the stored one has only
        the new events encoded against the stored state, when that is exact (see
        :mod:`onetrans_trt.runtime.append`); ``True`` for a torch backend, or an appender
        (:meth:`load` makes the ONNX Runtime one from the build's append graph).
        ``append_runs`` counts the appends, ``RankResult.user_state`` says per request where
        the state came from (``stored``, ``appended``, ``encoded``) and why."""
        if chunk_size < 1:
            raise InputError("chunk_size must be >= 1")
        self.schema, self.tasks, self.backend, self.chunk_size = schema, tasks, backend, chunk_size
        self.cache = cache
        self.limits = limits or RequestLimits()
        self.encoder_runs = 0
        self._runs_lock = threading.Lock()
        self.store, self.build_hash = None, build_hash
        if store is not None:
            from onetrans_trt.runtime.cache import UserKVCache
            from onetrans_trt.runtime.store import store_from_url

            if isinstance(store, UserKVCache):
                raise InputError("a UserKVCache goes in cache=; store= takes a URL or a LocalStore/RedisStore")
            if cache is not None:
                raise InputError("give the Ranker a cache= or a store=, not both")
            if not getattr(backend, "split", False):
                raise InputError(f"backend {backend.name!r} encodes no user state to store; use a split backend "
                                 "(torch-split, ort, ort-fp16, ort-int8, trt...) with store=")
            if self.build_hash is None:
                if not hasattr(backend, "model"):
                    raise InputError("store= needs build_hash= naming the user encoder the states come from "
                                     "(Ranker.load computes it)")
                self.build_hash = model_hash(backend.model, backend.name)
            self.store = (store_from_url(store, build_hash=self.build_hash, family=family)
                          if isinstance(store, str) else store)
            self.store.bind(self.build_hash)
        self.appender = None
        self.append_runs = 0
        if append is not False and append is not None:
            if self.store is None:
                raise InputError("append needs a store= (the stored states are what new events are appended to)")
            if append is True:
                from onetrans_trt.runtime.append import appender_for

                append = appender_for(backend)
            self.appender = append

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @classmethod
    def load(cls, path: str | Path, backend: str | None = None, **kw: Any) -> "Ranker":
        """Load a checkpoint directory (torch backends) or a build directory (ORT/TensorRT backends).

        Backends: ``torch-split`` / ``torch-unified`` for a checkpoint; ``ort`` (default for a
        build), ``ort-fp16``, ``ort-int8`` (on the CPU: ``int8-cpu/`` when the build has it, else
        ``int8/``), ``ort-int8-qdq`` (``int8/``: TensorRT's Q/DQ graphs), ``ort-int8-cpu``
        (``int8-cpu/``; :mod:`onetrans_trt.variants`), ``ort-unified`` (needs ``export --unified``) and
        ``trt``/``trt-fp16``/``trt-int8`` for a build. Without ``backend`` a checkpoint gets
        ``torch-split`` when its model splits into user encoder and candidate scorer, else
        (the ``baseline`` family) ``torch-unified``. ``kw``: ``cache``, ``limits``,
        ``chunk_size``, ``store`` (see :class:`Ranker`); ``providers``, ``threads`` for ORT
        backends. With ``store``, the build hash is the sha256 of the backend's name and the user
        encoder it runs (the graph file and its external data, or the TensorRT engine),
        computed here once; a checkpoint's is :func:`model_hash`.
        """
        path = Path(path)
        if (path / "manifest.json").is_file():
            return cls._load_build(path, backend or "ort", **kw)
        from onetrans_trt.models.checkpoint import load_checkpoint
        from onetrans_trt.runtime.backends import TORCH_BACKENDS

        if backend is not None and backend not in TORCH_BACKENDS:
            raise InputError(f"unknown backend {backend!r} for a checkpoint; choose one of {sorted(TORCH_BACKENDS)}")
        model = load_checkpoint(path)
        if backend is None:
            backend = "torch-split" if hasattr(model, "encode_user") else "torch-unified"
        if kw.get("store") is not None:
            kw.setdefault("family", model.cfg.family)
        return cls(model.cfg.schema, list(model.cfg.tasks), TORCH_BACKENDS[backend](model), **kw)

    @classmethod
    def _load_build(cls, build: Path, backend: str, *, providers: list[str] | None = None,
                    threads: int | None = None, **kw: Any) -> "Ranker":
        from onetrans_trt import lineage
        from onetrans_trt.export.api import read_manifest
        from onetrans_trt.models.config import read_config
        from onetrans_trt.runtime.ort_backend import OrtSplitBackend, OrtUnifiedBackend

        manifest = read_manifest(build)
        cfg = read_config(build)
        from onetrans_trt.variants import (ORT_BACKENDS, SUBDIR, graph_file, has_variant, make_command,
                                           variant_of)

        if backend == "ort":
            b: Any = OrtSplitBackend(build, providers=providers, threads=threads)
        elif backend in ORT_BACKENDS:  # a precision variant (onetrans_trt.variants)
            variant = variant_of(build, backend, on_cpu=runs_on_cpu(providers))
            if not has_variant(build, variant):
                how = make_command(variant).replace(" BUILD", f" {build}")
                more = " (or `onetrans-trt calibrate BUILD --target cpu` for CPU serving)" \
                    if backend == "ort-int8" else ""
                raise InputError(f"{build}: no {SUBDIR[variant]}/ graphs for backend {backend!r}; run `{how}` "
                                 f"first{more}")
            lineage.check_variant(build, manifest, variant)  # made from graphs since rewritten: refused
            b = OrtSplitBackend(build, name=backend, user_graph=graph_file(variant, "user_encoder"),
                                scorer_graph=graph_file(variant, "candidate_scorer"),
                                providers=providers, threads=threads)
            b.variant = variant
            if variant == "int8-cpu":
                b.note = (b.note + "; " if b.note else "") + ("int8-cpu/: INT8 candidate scorer for ONNX Runtime's CPU "
                                                              "integer kernels, float32 user encoder")
        elif backend.startswith("trt"):
            from onetrans_trt.runtime.trt_backend import TrtSplitBackend

            precision = backend.split("-")[1] if "-" in backend else "fp32"
            if precision in ("fp32", "fp16", "int8"):
                lineage.check_engines(build, manifest, precision)
            b = TrtSplitBackend(build, precision=precision)
        elif backend == "ort-unified":
            if not (build / "unified.onnx").is_file():
                raise InputError(f"{build}: no unified.onnx; export with --unified for the 'ort-unified' backend")
            b = OrtUnifiedBackend(build, providers=providers, threads=threads)
        else:
            raise InputError(f"unknown backend {backend!r} for a build; choose one of "
                             f"'ort', 'ort-fp16', 'ort-int8', 'ort-int8-qdq', 'ort-int8-cpu', 'ort-unified', 'trt', "
                             f"'trt-fp16', 'trt-int8'")
        if kw.get("append") is True:
            from onetrans_trt.runtime.append import appender_for

            kw["append"] = appender_for(b, build, cfg, providers=providers, threads=threads)
        if kw.get("store") is not None and getattr(b, "split", False):
            kw.setdefault("family", cfg.family)
            if kw.get("build_hash") is None:
                kw["build_hash"] = files_hash(b.name, encoder_files(build, backend, getattr(b, "variant", None)))
        return cls(cfg.schema, list(cfg.tasks), b, **kw)

    @classmethod
    def from_model(cls, model: Any, backend: str = "torch-split", **kw: Any) -> "Ranker":
        """A Ranker over an in-memory model; with ``store``, the build hash is :func:`model_hash`."""
        from onetrans_trt.runtime.backends import TORCH_BACKENDS

        if kw.get("store") is not None:
            kw.setdefault("family", getattr(model.cfg, "family", ""))
        return cls(model.cfg.schema, list(model.cfg.tasks), TORCH_BACKENDS[backend](model), **kw)

    def rank(self, request: Request | dict) -> RankResult:
        req = request if isinstance(request, Request) else Request.from_json(request)
        req, cut = self.limits.apply(req)
        hist, ns = encode_request(self.schema, req)
        c = len(req.candidates)
        chunks = [{k: v[i:i + self.chunk_size] for k, v in ns.items()} for i in range(0, c, self.chunk_size)]
        said = None
        if self.backend.split:
            if self.store is not None and self.appender is not None:
                kv, said = self._stored_or_appended(req.user_key, hist)
            elif self.store is not None:
                kv, _ = self.store.get_or_compute(req.user_key, hist, lambda: self._encode(hist))
            elif self.cache is not None:
                kv = self.cache.get_or_compute(req.user_key, hist, lambda: self._encode(hist))
            else:
                kv = self._encode(hist)
            parts = [self.backend.score(kv, ch) for ch in chunks]
        else:
            parts = [self.backend.score_unified(hist, ch) for ch in chunks]
        logits = np.concatenate(parts) if parts else np.zeros((0, len(self.tasks)), np.float32)
        return RankResult(self.tasks, logits, req.user_key, cut or None, said)

    def _encode(self, hist: dict[str, np.ndarray]) -> Any:
        with self._runs_lock:
            self.encoder_runs += 1
        if self.appender is not None:
            kv = self.appender.encode(hist)  # a state the appender can extend later (HyFormer: + self-attn K/V)
            if kv is not None:
                return kv
        return self.backend.encode_user(hist)

    def _stored_or_appended(self, user_key: str | None, hist: dict[str, np.ndarray]) -> tuple[Any, dict]:
        """The state of ``hist``: stored, else appended to the user's latest stored state when
        exact, else encoded; stores it and ``hist`` as the user's latest history."""
        from onetrans_trt.runtime.append import LATEST, plan
        from onetrans_trt.runtime.state import history_fingerprint, named_state

        said: dict[str, Any] = {}

        def compute() -> Any:
            reason = "the request has no user_key" if not user_key else "no earlier history of this user is stored"
            latest = self.store.get(user_key, LATEST) if user_key else None
            if latest is not None:
                old_hist = {k: np.asarray(v) for k, v in latest.extras.items()}
                kv_old = self.store.get(user_key, history_fingerprint(old_hist))
                reason = "the latest history's state is no longer stored" if kv_old is None else \
                    self.appender.fits(kv_old, old_hist)
                if kv_old is not None and not reason:
                    d = plan(self.appender.cfg, old_hist, hist)
                    reason = d.reason
                    if d.ok:
                        kv = kv_old if d.k == 0 else self.appender.append(kv_old, d, old_hist, hist)
                        with self._runs_lock:
                            self.append_runs += d.k > 0
                        said.update(source="appended", new_events=d.k, reason=d.reason)
                        return kv
            said.update(source="encoded", reason=reason)
            return self._encode(hist)

        kv, hit = self.store.get_or_compute(user_key, hist, compute)
        if hit:
            said.clear()
            said.update(source="stored", reason="this history's state was stored")
        elif user_key:
            self.store.put(user_key, LATEST, named_state(hist))
        return kv, said


def encoder_files(build: Path, backend: str, variant: str | None = None) -> list[Path]:
    """The files the user encoder of ``backend`` runs from in ``build``: the graph and its
    external data (``<graph>.data``, when there), or the TensorRT engine."""
    if backend.startswith("trt"):
        precision = backend.split("-")[1] if "-" in backend else "fp32"
        return [build / "engines" / precision / "user_encoder.engine"]
    from onetrans_trt.variants import graph_path, variant_of

    graph = graph_path(build, variant or variant_of(build, backend, on_cpu=runs_on_cpu(None)), "user_encoder")
    return [graph] + [p for p in [graph.with_name(graph.name + ".data")] if p.is_file()]


def runs_on_cpu(providers: list[str] | None) -> bool:
    """Whether ONNX Runtime sessions with ``providers`` (None: the default ones) run on the CPU."""
    from onetrans_trt.runtime.ort_backend import default_providers

    return (providers or default_providers())[0] == "CPUExecutionProvider"


def files_hash(name: str, files: list[Path]) -> str:
    """sha256 over ``name`` and each file's length and bytes, in order (a build hash)."""
    h = hashlib.sha256(f"{name}\0".encode())
    for f in files:
        h.update(f"{f.stat().st_size}\0".encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_hash(model: Any, name: str = "") -> str:
    """sha256 over ``name``, the model's class and every state-dict tensor (name, dtype,
    shape, bytes) in name order: the build hash of an in-memory model's states."""
    import torch

    h = hashlib.sha256(f"{name}\0{type(model).__name__}\0".encode())
    for key, t in sorted(model.state_dict().items()):
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
