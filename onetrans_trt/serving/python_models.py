"""What the models of ``serve-repo --backend python`` run inside Triton's Python backend.

Each generated ``model.py`` puts ``PYTHONPATH`` on ``sys.path`` (the stub ignores it) and
imports one class from here as ``TritonPythonModel``:

- :class:`UserEncoder`: ``user_encoder.onnx`` under ONNX Runtime; batching over users
  (Triton hands it a list of requests, each ``[N, ...]``; each runs as its own batch).
- :class:`CandidateScorer`: ``candidate_scorer.onnx``; one user per request, candidates
  scored in chunks of ``chunk_size`` (as :class:`~onetrans_trt.runtime.ranker.Ranker`).
- :class:`UserBatchScorer`: ``candidate_scorer_users``, the packed scorer
  (:mod:`onetrans_trt.graphs.segment_users`); Triton's dynamic batcher hands it the requests of
  several users (one user each, shapes differing: ragged inputs), scored in one ORT call.
- :class:`Preprocess`: the request JSON (a BYTES tensor ``[1]``) to the model tensors with
  :func:`~onetrans_trt.data.requests.encode_request` under the repository's
  :class:`~onetrans_trt.data.requests.RequestLimits`; a bad request is that request's
  error response, naming the field (the other requests of the batch are unaffected).
- :class:`CachedRank`: the request JSON to logits and probs like the ``rank`` ensemble, but
  orchestrated in Python (BLS): the user's K/V come from a cache keyed by the repository's
  graphs (their sha256), the request's ``user_key`` and a fingerprint of the encoded history
  (:class:`~onetrans_trt.runtime.cache.UserKVCache`), so a repeated user never reaches the
  ``user_encoder`` model; a miss calls it, then ``candidate_scorer`` is called either way.

The graph, the schema (``config.json``) and the limits are read from the model's version
directory and ``config.pbtxt`` parameters; nothing here depends on the build directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

_NP = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64, "TYPE_INT64": np.int64,
       "TYPE_INT32": np.int32, "TYPE_INT16": np.int16, "TYPE_INT8": np.int8, "TYPE_UINT8": np.uint8,
       "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32, "TYPE_UINT64": np.uint64, "TYPE_BOOL": np.bool_}
_ORT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
        "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _pb():
    import triton_python_backend_utils as pb_utils  # only inside the stub

    return pb_utils


def _config(args: dict) -> dict:
    return json.loads(args["model_config"])


def _params(cfg: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}


def _version_dir(args: dict) -> Path:
    return Path(args["model_repository"]) / str(args["model_version"])


def _to_rank(x: np.ndarray, rank: int) -> np.ndarray:
    """``x`` with trailing size-1 axes dropped or added to reach ``rank`` (a per-user scalar
    travels as ``[N, 1]``; the graph reads ``[N]``, and back)."""
    while x.ndim > rank and x.shape[-1] == 1:
        x = x[..., 0]
    while x.ndim < rank:
        x = x[..., None]
    return x


def _error(exc: BaseException):
    pb = _pb()
    msg = str(exc) if getattr(exc, "exit_code", None) else f"{type(exc).__name__}: {exc}"
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(msg[:2000]))


class _GraphModel:
    """An ONNX graph under ONNX Runtime (``model.onnx`` in the version directory)."""

    def initialize(self, args: dict) -> None:
        from onetrans_trt.runtime.ort_backend import graph_session

        cfg = _config(args)
        params = _params(cfg)
        threads = int(params.get("intra_op_threads") or 0) or None
        self.sess, self.note = graph_session(_version_dir(args) / "model.onnx", None, threads)
        self.inputs = {i.name: (len(i.shape), _ORT.get(i.type)) for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.out_types = {o["name"]: _NP.get(o["data_type"]) for o in cfg["output"]}
        self.out_dims = {o["name"]: [int(d) for d in o["dims"]] for o in cfg["output"]}
        self.chunk = int(params.get("chunk_size") or 512)
        self.per_candidate = json.loads(params.get("candidate_inputs") or "[]")

    def _feeds(self, request) -> dict[str, np.ndarray]:
        pb = _pb()
        feeds = {}
        for name, (rank, dtype) in self.inputs.items():
            t = pb.get_input_tensor_by_name(request, name)
            if t is None:
                raise KeyError(f"input {name} missing")
            x = _to_rank(t.as_numpy(), rank)
            feeds[name] = x if dtype is None or x.dtype == dtype else x.astype(dtype)
        return feeds

    def _response(self, values: dict[str, np.ndarray]):
        pb = _pb()
        out = []
        for name in self.out_types:
            x = values[name]
            want = self.out_types[name]
            out.append(pb.Tensor(name, np.ascontiguousarray(x if want is None or x.dtype == want else x.astype(want))))
        return pb.InferenceResponse(output_tensors=out)

    def finalize(self) -> None:
        self.sess = None


class UserEncoder(_GraphModel):
    def execute(self, requests: list) -> list:
        responses = []
        for r in requests:
            try:
                feeds = self._feeds(r)
                names = list(self.out_types)
                responses.append(self._response(dict(zip(names, self.sess.run(names, feeds)))))
            except Exception as e:  # noqa: BLE001 - one request's error is its own response
                responses.append(_error(e))
        return responses


class CandidateScorer(_GraphModel):
    def execute(self, requests: list) -> list:
        responses = []
        for r in requests:
            try:
                feeds = self._feeds(r)
                per_candidate = self.per_candidate or [n for n in feeds if n.startswith("ns_")]
                names = list(self.out_types)
                c = feeds[per_candidate[0]].shape[0] if per_candidate else 0
                parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
                for start in range(0, c, self.chunk):
                    chunk = {k: (v[start:start + self.chunk] if k in per_candidate else v) for k, v in feeds.items()}
                    for n, v in zip(names, self.sess.run(names, chunk)):
                        parts[n].append(v)
                if c == 0:  # no candidates: empty outputs of the right width, no graph run
                    values = {n: np.zeros((0, *[max(d, 0) for d in self.out_dims[n][1:]]), self.out_types[n] or
                                          np.float32) for n in names}
                else:
                    values = {n: np.concatenate(parts[n]) for n in names}
                responses.append(self._response(values))
            except Exception as e:  # noqa: BLE001
                responses.append(_error(e))
        return responses


class UserBatchScorer:
    """Several users' requests (each ``[1, ...]``: one user's K/V, length, ``[1, C, ...]``
    candidates) scored in one run of the packed scorer: users packed by
    :func:`~onetrans_trt.graphs.segment_users.pack`, at most ``chunk_size`` candidates per run
    (a user with more runs alone, in chunks). A malformed request is its own error response."""

    def initialize(self, args: dict) -> None:
        from onetrans_trt.graphs.segment_users import META_KEY, Plan
        from onetrans_trt.runtime.ort_backend import graph_session

        cfg = _config(args)
        params = _params(cfg)
        threads = int(params.get("intra_op_threads") or 0) or None
        self.sess, self.note = graph_session(_version_dir(args) / "model.onnx", None, threads)
        meta = self.sess.get_modelmeta().custom_metadata_map
        self.plan = Plan(**json.loads(meta[META_KEY]))
        self.types = {i.name: _ORT.get(i.type) for i in self.sess.get_inputs()}
        self.out_types = {o["name"]: _NP.get(o["data_type"]) for o in cfg["output"]}
        self.out_dims = {o["name"]: [int(d) for d in o["dims"]] for o in cfg["output"]}
        self.chunk = int(params.get("chunk_size") or 512)

    def _user(self, request) -> dict[str, np.ndarray]:
        """One request's tensors as the one-user scorer's feeds (the batch axis dropped)."""
        from onetrans_trt.errors import InputError

        pb = _pb()
        feeds = {}
        for name in [*self.plan.kv, *self.plan.rows, *self.plan.per_candidate]:
            t = pb.get_input_tensor_by_name(request, name)
            if t is None:
                raise InputError(f"input {name} missing")
            x = t.as_numpy()
            if x.ndim < 1 or x.shape[0] != 1:
                raise InputError(f"{name}: one user per request (batch axis 1), got shape {list(x.shape)}")
            if name in self.plan.rows:  # one user's row in the graph's own shape ([1] for s_length)
                shape = [1, *self.plan.shapes[name][1:]]
                if shape.count(-1) <= 1:
                    x = x.reshape(shape)
            elif name in self.plan.per_candidate:
                x = x[0]
            want = self.types.get(name)
            feeds[name] = x if want is None or x.dtype == want else x.astype(want)
        return feeds

    def _run(self, users: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        from onetrans_trt.graphs.segment_users import pack, unpack

        names = list(self.out_types)
        counts = [int(u[self.plan.per_candidate[0]].shape[0]) for u in users]
        outs = self.sess.run(names, pack(self.plan, users))
        return unpack(dict(zip(names, outs)), counts)

    def execute(self, requests: list) -> list:
        pb = _pb()
        results: list[Any] = [None] * len(requests)
        users: list[tuple[int, dict[str, np.ndarray]]] = []
        for i, r in enumerate(requests):
            try:
                users.append((i, self._user(r)))
            except Exception as e:  # noqa: BLE001 - one request's error is its own response
                results[i] = e
        groups: list[list[tuple[int, dict[str, np.ndarray]]]] = [[]]
        size = 0
        for i, u in users:
            c = int(u[self.plan.per_candidate[0]].shape[0])
            if c > self.chunk:  # alone, in chunks of its candidates
                groups.append([(i, {**u, **{n: u[n][s:s + self.chunk] for n in self.plan.per_candidate}})
                               for s in range(0, c, self.chunk)])
                groups.append([])
                size = 0
                continue
            if size + c > self.chunk and groups[-1]:
                groups.append([])
                size = 0
            groups[-1].append((i, u))
            size += c
        for group in (g for g in groups if g):
            try:
                live = [(i, u) for i, u in group if u[self.plan.per_candidate[0]].shape[0]]
                parts = self._run([u for _, u in live]) if live else []
                done = dict.fromkeys(i for i, _ in group)
                for (i, _), part in zip(live, parts):
                    results[i] = (results[i] or []) + [part]
                for i in done:
                    if results[i] is None:
                        results[i] = []
            except Exception as e:  # noqa: BLE001 - the group's error, for each of its requests
                for i, _ in group:
                    results[i] = e
        responses = []
        for res in results:
            if isinstance(res, BaseException):
                responses.append(_error(res))
                continue
            values = {}
            for n, want in self.out_types.items():
                if res:
                    x = np.concatenate([p[n] for p in res])
                else:  # no candidates: empty rows of the right width
                    x = np.zeros((0, *[max(d, 0) for d in self.out_dims[n][1:]]), want or np.float32)
                values[n] = np.ascontiguousarray((x if want is None or x.dtype == want else x.astype(want))[None])
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(n, v) for n, v in values.items()]))
        return responses

    def finalize(self) -> None:
        self.sess = None


class Preprocess:
    """Raw request JSON in, the ``onetrans`` ensemble's tensors out."""

    def initialize(self, args: dict) -> None:
        cfg = _config(args)
        self._setup(args, {o["name"]: (_NP[o["data_type"]], len(o["dims"])) for o in cfg["output"]})

    def _setup(self, args: dict, outputs: dict[str, tuple[Any, int]]) -> None:
        from onetrans_trt.data.requests import RequestLimits
        from onetrans_trt.models.config import read_config

        params = _params(_config(args))
        self.schema = read_config(_version_dir(args)).schema
        self.limits = RequestLimits.from_json(json.loads(params["limits"])) if params.get("limits") \
            else RequestLimits()
        self.outputs = outputs
        # tensors given a leading axis of 1 (preprocess_users: the candidates of one user, [1, C, ...])
        self.leading = set(json.loads(params.get("leading_axis") or "[]"))

    def encode(self, raw: bytes) -> dict[str, np.ndarray]:
        """The tensors of one request, as the ensemble's inputs (raises RequestError)."""
        return self.encode_request(raw)[1]

    def encode_request(self, raw: bytes) -> tuple[Any, dict[str, np.ndarray]]:
        """``(request, tensors)`` of one request JSON (raises RequestError)."""
        from onetrans_trt.data.requests import Request, encode_request, history_feeds, is_sequence_input
        from onetrans_trt.errors import RequestError

        if len(raw) > self.limits.max_request_bytes:
            raise RequestError(f"request: {len(raw)} bytes is over {self.limits.max_request_bytes} "
                               "(limits.max_request_bytes)")
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise RequestError(f"request: not JSON ({str(e)[:120]})") from None
        req, _ = self.limits.apply(Request.from_json(obj))
        hist, ns = encode_request(self.schema, req)
        own = [n for n in self.outputs if is_sequence_input(n)]  # HyFormer: each sequence on its own
        have = {**hist, **(history_feeds(hist, own, self.schema) if own else {}), **ns}
        out = {}
        for name, (dtype, rank) in self.outputs.items():
            if name not in have:
                raise RequestError(f"request: the encoding has no tensor {name}")
            lead = name in self.leading
            x = _to_rank(np.asarray(have[name]), rank - lead).astype(dtype, copy=False)
            out[name] = np.ascontiguousarray(x[None] if lead else x)
        return req, out

    def execute(self, requests: list) -> list:
        pb = _pb()
        responses = []
        for r in requests:
            try:
                responses.append(pb.InferenceResponse(
                    output_tensors=[pb.Tensor(n, v) for n, v in self.encode(_raw_request(r)).items()]))
            except Exception as e:  # noqa: BLE001 - a bad request is its own error response
                responses.append(_error(e))
        return responses

    def finalize(self) -> None:
        pass


def _raw_request(r) -> bytes:
    """The one JSON request of a ``request`` BYTES tensor."""
    t = _pb().get_input_tensor_by_name(r, "request")
    if t is None:
        raise KeyError("input request missing")
    items = t.as_numpy().reshape(-1)
    if items.size != 1:
        from onetrans_trt.errors import RequestError

        raise RequestError(f"request: expected one JSON request, got {items.size}")
    raw = items[0]
    return raw if isinstance(raw, bytes) else str(raw).encode("utf-8")


class _State(dict):
    """One user's K/V (and any other encoder output) as the cache holds it."""

    def nbytes(self) -> int:
        return int(sum(v.nbytes for v in self.values()))


def _graph_files(repository: Path) -> list[tuple[str, Path]]:
    """``(label, path)`` of the two graphs' files a repository may hold, in a fixed order."""
    return [(f"{role}/{name}", repository / role / "1" / name)
            for role in ("user_encoder", "candidate_scorer", "candidate_scorer_users")
            for name in ("model.onnx", "model.onnx.data")]


def graphs_sha256(repository: Path) -> str:
    """The sha256 over the repository's ``user_encoder``, ``candidate_scorer`` and (when there)
    ``candidate_scorer_users`` graphs (``1/model.onnx`` and any ``1/model.onnx.data``), in order."""
    import hashlib

    h = hashlib.sha256()
    for label, f in _graph_files(repository):
        if f.is_file():
            h.update(f"{label}\0".encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


class CachedRank(Preprocess):
    """Request JSON in, ``logits``/``probs`` out; users' K/V cached in this model instance.

    The key is (the graphs' sha256 this repository was written with, ``user_key``, the encoded
    history's fingerprint). At load the graphs on disk must have that sha256 (else the model
    refuses to load: the repository was edited by hand; regenerate it with ``serve-repo``); a
    new ``serve-repo`` of another build rewrites this model's config, so Triton reloads it with
    an empty cache. Each request also checks the two graph files' size and mtime: if either
    changed since load, the cache is dropped and stays off until this model is reloaded (a
    stale K/V is never served)."""

    def initialize(self, args: dict) -> None:
        from onetrans_trt.runtime.cache import UserKVCache

        cfg = _config(args)
        params = _params(cfg)
        wiring = json.loads(params["wiring"])
        tensors = json.loads(params["tensors"])
        self._setup(args, {t["name"]: (_NP[t["data_type"]], len(t["dims"])) for t in tensors})
        self.user_inputs, self.state = wiring["user_inputs"], wiring["state"]
        self.scorer_inputs = wiring["candidate_inputs"] + wiring.get("shared", []) + wiring["state"]
        self.shared_user = set(wiring.get("shared", []))  # per-user inputs the scorer reads (s_length)
        self.out_names = [o["name"] for o in cfg["output"]]
        self.repository = Path(args["model_repository"]).parent
        self.sha = params["graphs_sha256"]
        got = graphs_sha256(self.repository)
        if got != self.sha:
            from onetrans_trt.errors import BuildError

            raise BuildError(f"{self.repository}: the user_encoder/candidate_scorer graphs are not the ones this "
                             f"repository was written with (sha256 {got[:12]}.. != {self.sha[:12]}..); "
                             "regenerate it with `onetrans-trt serve-repo`")
        self.files = self._stamp()
        # "candidate_scorer_users": the packed scorer, whose dynamic batcher merges the calls of
        # concurrent requests (of this model's instances) into one run; else one user per call
        self.scorer = params.get("scorer") or "candidate_scorer"
        self.cache = UserKVCache(int(params.get("user_cache_bytes") or 0))
        self.enabled = self.cache.max_bytes > 0
        # a shared store (serve-repo --store URL): every instance and replica reads the users any
        # of them encoded; keyed by the same graphs sha256, so another build never reads them
        self.store = None
        if params.get("store"):
            from onetrans_trt.runtime.store import store_from_url

            self.store = store_from_url(params["store"], build_hash=self.sha)
            self.enabled = True

    def _stamp(self) -> list[tuple[int, int]]:
        stats = [f.stat() if f.is_file() else None for _, f in _graph_files(self.repository)]
        return [(st.st_size, st.st_mtime_ns) if st else (-1, -1) for st in stats]

    def _call(self, model: str, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        pb = _pb()
        req = pb.InferenceRequest(model_name=model, requested_output_names=names,
                                  inputs=[pb.Tensor(n, np.ascontiguousarray(v)) for n, v in feeds.items()])
        resp = req.exec()
        if resp.has_error():
            raise RuntimeError(f"{model}: {resp.error().message()}")
        return {n: pb.get_output_tensor_by_name(resp, n).as_numpy() for n in names}

    def score(self, raw: bytes) -> dict[str, np.ndarray]:
        req, tensors = self.encode_request(raw)
        hist = {n: tensors[n] for n in self.user_inputs}

        def encode() -> _State:
            out = self._call("user_encoder", hist, self.state)
            return _State({n: np.array(v, copy=True) for n, v in out.items()})  # owned: BLS buffers are freed

        if self.enabled and self._stamp() != self.files:
            self.enabled = False  # a graph file changed under us: never serve K/V of the old one
            self.cache = type(self.cache)(0)
            if self.store is not None:
                self.store.close()
                self.store = None
        if self.enabled and self.store is not None:
            from onetrans_trt.runtime.state import named_state

            kv, _ = self.store.get_or_compute(req.user_key or "", hist, lambda: named_state(encode()))
            state = _State(kv.extras)
        elif self.enabled:
            state = self.cache.get_or_compute(f"{self.sha}/{req.user_key or ''}", hist, encode)
        else:
            state = encode()
        feeds = {n: (state[n] if n in state else tensors[n]) for n in self.scorer_inputs}
        if self.scorer == "candidate_scorer":
            return self._call("candidate_scorer", feeds, self.out_names)
        # one user per request of the batching scorer: a batch axis of 1 on every tensor (the K/V
        # and the per-user rows have it already: [1, ...])
        batched = {n: (v if n in self.state else v.reshape(1, -1) if n in self.shared_user else v[None])
                   for n, v in feeds.items()}
        return {n: v[0] for n, v in self._call(self.scorer, batched, self.out_names).items()}

    def execute(self, requests: list) -> list:
        pb = _pb()
        responses = []
        for r in requests:
            try:
                out = self.score(_raw_request(r))
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(n, out[n]) for n in self.out_names]))
            except Exception as e:  # noqa: BLE001 - a bad request is its own error response
                responses.append(_error(e))
        return responses


def describe(args: Any = None) -> str:  # pragma: no cover - debugging aid inside the stub
    import sys

    return f"python {sys.version.split()[0]} numpy {np.__version__} at {sys.prefix}"
