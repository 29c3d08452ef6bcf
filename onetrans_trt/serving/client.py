"""Clients of a served repository, over HTTP (KServe v2 JSON, the standard library only) and
gRPC (``tritonclient[grpc]``).

    rank_http("127.0.0.1:8000", request_json)        # the `rank` ensemble: raw JSON in
    infer_http("127.0.0.1:8000", "onetrans", tensors) # the tensor-level ensemble
    ensemble_tensors(schema, request)                 # what a self-encoding client sends

Each returns ``{"logits": [C, tasks], "probs": [C, tasks]}`` (numpy); a server-side error
(a malformed request: the field named) raises :class:`ServingError` with its message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Mapping

import numpy as np

from onetrans_trt.errors import OneTransError

_DT = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.float64): "FP64",
       np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.int8): "INT8",
       np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL"}
_NP = {v: k for k, v in _DT.items()}
OUTPUTS = ("logits", "probs")


class ServingError(OneTransError):
    """The server answered with an error (its message), or not at all."""


def _json_text(request: Any) -> str:
    if isinstance(request, (bytes, bytearray)):
        return bytes(request).decode("utf-8")
    if isinstance(request, str):
        return request
    if hasattr(request, "to_json"):
        request = request.to_json()
    return json.dumps(request)


def ensemble_tensors(schema: Any, request: Any, limits: Any = None, *,
                     per_sequence: bool = False) -> dict[str, np.ndarray]:
    """The ``onetrans`` ensemble's inputs for one request, encoded here with
    :func:`~onetrans_trt.data.requests.encode_request` (as the ``preprocess`` model does):
    user tensors ``[1, ...]`` (a per-user scalar such as ``s_length`` ``[1, 1]``), candidate
    tensors ``[C, ...]``. ``per_sequence`` (HyFormer builds, whose user encoder reads each
    sequence on its own): the user tensors are ``s<j>_<field>`` ``[1, W_j]`` and
    ``s<j>_length`` ``[1, 1]`` instead of the merged stream."""
    from onetrans_trt.data.requests import Request, RequestLimits, encode_request, split_sequences

    req = request if isinstance(request, Request) else Request.from_json(
        json.loads(_json_text(request)) if isinstance(request, (str, bytes, bytearray)) else request)
    req, _ = (limits or RequestLimits()).apply(req)
    hist, ns = encode_request(schema, req)
    if per_sequence:
        hist = split_sequences(schema, hist)
    out = {k: (np.asarray(v).reshape(1, 1) if np.asarray(v).ndim == 1 else np.asarray(v)) for k, v in hist.items()}
    out.update({k: np.asarray(v) for k, v in ns.items()})
    return out


# ------------------------------------------------------------------ HTTP (KServe v2 JSON)

def _http_json(url: str, path: str, body: dict | None, timeout: float) -> dict:
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(f"http://{url}{path}", data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8") or "{}")
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read().decode("utf-8")).get("error", str(e))
        except ValueError:
            msg = str(e)
        raise ServingError(msg) from None
    except (urllib.error.URLError, OSError) as e:
        raise ServingError(f"{url}: no answer ({e})") from None


def _outputs_from_json(res: dict, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    got = {o["name"]: o for o in res.get("outputs", [])}
    return {n: np.asarray(got[n]["data"], dtype=_NP.get(got[n]["datatype"], np.float32)).reshape(got[n]["shape"])
            for n in names if n in got}


def infer_http(url: str, model: str, tensors: Mapping[str, np.ndarray], *, outputs: tuple[str, ...] = OUTPUTS,
               timeout: float = 60.0) -> dict[str, np.ndarray]:
    inputs = []
    for name, x in tensors.items():
        x = np.asarray(x)
        inputs.append({"name": name, "shape": list(x.shape), "datatype": _DT[x.dtype], "data": x.reshape(-1).tolist()})
    body = {"inputs": inputs, "outputs": [{"name": n} for n in outputs]}
    return _outputs_from_json(_http_json(url, f"/v2/models/{model}/infer", body, timeout), outputs)


def rank_http(url: str, request: Any, *, model: str = "rank", timeout: float = 60.0) -> dict[str, np.ndarray]:
    """The raw request (a dict, a Request, or its JSON text) to the ``rank`` ensemble."""
    body = {"inputs": [{"name": "request", "shape": [1], "datatype": "BYTES", "data": [_json_text(request)]}],
            "outputs": [{"name": n} for n in OUTPUTS]}
    return _outputs_from_json(_http_json(url, f"/v2/models/{model}/infer", body, timeout), OUTPUTS)


def model_statistics_http(url: str, model: str, timeout: float = 10.0) -> dict:
    return _http_json(url, f"/v2/models/{model}/stats", None, timeout)


def successes_http(url: str, model: str, timeout: float = 10.0, *, settle: float = 0.1,
                   max_wait: float = 5.0) -> int:
    """How many requests ``model`` has answered successfully (Triton's statistics, all versions).
    A backend reports a request's statistics after sending its response, so a count read right
    after a response may still be one short: the count is read until two reads ``settle``
    seconds apart agree (at most ``max_wait`` seconds)."""
    import time

    def count() -> int:
        stats = model_statistics_http(url, model, timeout)
        return sum(int(m.get("inference_stats", {}).get("success", {}).get("count", 0))
                   for m in stats.get("model_stats", []))

    deadline, last = time.monotonic() + max_wait, count()
    while True:
        time.sleep(settle)
        now = count()
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def load_model_http(url: str, model: str, timeout: float = 120.0) -> None:
    """(Re)load ``model`` from the repository (a server started with ``--model-control-mode=explicit``)."""
    _http_json(url, f"/v2/repository/models/{model}/load", {}, timeout)


# ------------------------------------------------------------------ gRPC

def _grpc():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        from onetrans_trt.errors import MissingCapabilityError

        raise MissingCapabilityError("the gRPC client needs tritonclient: pip install 'tritonclient[grpc]'") from None
    return grpcclient


def _grpc_call(url: str, model: str, inputs: list, outputs: tuple[str, ...], timeout: float) -> dict[str, np.ndarray]:
    g = _grpc()
    from tritonclient.utils import InferenceServerException

    client = g.InferenceServerClient(url)
    try:
        res = client.infer(model, inputs, outputs=[g.InferRequestedOutput(n) for n in outputs],
                           client_timeout=timeout)
    except InferenceServerException as e:
        raise ServingError(e.message() or str(e)) from None
    finally:
        client.close()
    return {n: res.as_numpy(n) for n in outputs}


def infer_grpc(url: str, model: str, tensors: Mapping[str, np.ndarray], *, outputs: tuple[str, ...] = OUTPUTS,
               timeout: float = 60.0) -> dict[str, np.ndarray]:
    g = _grpc()
    inputs = []
    for name, x in tensors.items():
        x = np.ascontiguousarray(x)
        i = g.InferInput(name, list(x.shape), _DT[x.dtype])
        i.set_data_from_numpy(x)
        inputs.append(i)
    return _grpc_call(url, model, inputs, outputs, timeout)


def rank_grpc(url: str, request: Any, *, model: str = "rank", timeout: float = 60.0) -> dict[str, np.ndarray]:
    g = _grpc()
    i = g.InferInput("request", [1], "BYTES")
    i.set_data_from_numpy(np.array([_json_text(request).encode("utf-8")], dtype=np.object_))
    return _grpc_call(url, model, [i], OUTPUTS, timeout)
