"""What the models of ``serve-repo --backend python`` run inside Triton's Python backend.

Each generated ``model.py`` puts ``PYTHONPATH`` on ``sys.path`` (the stub ignores it) and
imports one class from here as ``TritonPythonModel``:

- :class:`UserEncoder`: ``user_encoder.onnx`` under ONNX Runtime; batching over users
  (Triton hands it a list of requests, each ``[N, ...]``; each runs as its own batch).
- :class:`CandidateScorer`: ``candidate_scorer.onnx``; one user per request, candidates
  scored in chunks of ``chunk_size`` (as :class:`~onetrans_trt.runtime.ranker.Ranker`).
- :class:`Preprocess`: the request JSON (a BYTES tensor ``[1]``) to the model tensors with
  :func:`~onetrans_trt.data.requests.encode_request` under the repository's
  :class:`~onetrans_trt.data.requests.RequestLimits`; a bad request is that request's
  error response, naming the field (the other requests of the batch are unaffected).

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


class Preprocess:
    """Raw request JSON in, the ``onetrans`` ensemble's tensors out."""

    def initialize(self, args: dict) -> None:
        from onetrans_trt.data.requests import RequestLimits
        from onetrans_trt.models.config import read_config

        cfg = _config(args)
        params = _params(cfg)
        self.schema = read_config(_version_dir(args)).schema
        self.limits = RequestLimits.from_json(json.loads(params["limits"])) if params.get("limits") \
            else RequestLimits()
        self.outputs = {o["name"]: (_NP[o["data_type"]], len(o["dims"])) for o in cfg["output"]}

    def encode(self, raw: bytes) -> dict[str, np.ndarray]:
        """The tensors of one request, as the ensemble's inputs (raises RequestError)."""
        from onetrans_trt.data.requests import Request, encode_request
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
        have = {**hist, **ns}
        out = {}
        for name, (dtype, rank) in self.outputs.items():
            if name not in have:
                raise RequestError(f"request: the encoding has no tensor {name}")
            out[name] = np.ascontiguousarray(_to_rank(np.asarray(have[name]), rank).astype(dtype, copy=False))
        return out

    def execute(self, requests: list) -> list:
        pb = _pb()
        responses = []
        for r in requests:
            try:
                t = pb.get_input_tensor_by_name(r, "request")
                if t is None:
                    raise KeyError("input request missing")
                items = t.as_numpy().reshape(-1)
                if items.size != 1:
                    from onetrans_trt.errors import RequestError

                    raise RequestError(f"request: expected one JSON request, got {items.size}")
                raw = items[0]
                raw = raw if isinstance(raw, bytes) else str(raw).encode("utf-8")
                responses.append(pb.InferenceResponse(
                    output_tensors=[pb.Tensor(n, v) for n, v in self.encode(raw).items()]))
            except Exception as e:  # noqa: BLE001 - a bad request is its own error response
                responses.append(_error(e))
        return responses

    def finalize(self) -> None:
        pass


def describe(args: Any = None) -> str:  # pragma: no cover - debugging aid inside the stub
    import sys

    return f"python {sys.version.split()[0]} numpy {np.__version__} at {sys.prefix}"
