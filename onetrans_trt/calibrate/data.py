"""Calibration data from real requests.

The user encoder is calibrated on real histories (left-padded to the full width); the
candidate scorer on those users' candidates together with the K/V the float32 user
encoder produced for them, exactly what it sees when serving. Saved as one npz so a
quantization can be reproduced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from onetrans_trt.data.requests import encode_events, encode_ns, history_feeds, merge_stream, pad_streams


def calibration_requests(build: str | Path, n: int, *, data_dir=None, seed: int = 7, n_candidates: int = 16,
                         inputs: str | Path | None = None, synthetic: bool = False):
    """The calibration requests and where they came from: exactly the ``inputs`` file's
    (requests JSON/JSONL) when given, else training-period MovieLens requests for a build
    whose schema is MovieLens', else synthetic ones only when asked for."""
    from onetrans_trt.export.api import load_onetrans_config, sample_requests

    cfg = load_onetrans_config(build)
    if inputs is not None:
        from onetrans_trt.data.requests import RequestLimits, load_requests

        reqs = load_requests(Path(inputs), RequestLimits())
        return cfg, reqs, f"--inputs {inputs} ({len(reqs)} requests)"
    reqs, source = sample_requests(cfg, n, data_dir, seed=seed, n_candidates=n_candidates, period="train",
                                   synthetic=synthetic)
    return cfg, reqs, source


def build_calibration_set(build: str | Path, n: int, *, data_dir=None, progress=None, inputs=None,
                          synthetic: bool = False) -> dict[str, np.ndarray]:
    """``{"<i>/<input name>": array}`` for both graphs (``user/`` and ``scorer/`` prefixes)."""
    from onetrans_trt.runtime.ort_backend import ort_session

    build = Path(build)
    cfg, reqs, source = calibration_requests(build, n, data_dir=data_dir, inputs=inputs, synthetic=synthetic)
    schema = cfg.schema
    user = ort_session(build / "user_encoder.onnx")
    kv_names = [o.name for o in user.get_outputs()]
    user_names = [i.name for i in user.get_inputs()]
    scorer_inputs = {i.name for i in ort_session(build / "candidate_scorer.onnx").get_inputs()}
    arrays: dict[str, np.ndarray] = {"source": np.array(source)}
    for i, req in enumerate(reqs):
        stream = merge_stream(schema, encode_events(schema, req.history))
        hist = pad_streams(schema, [stream], length=schema.s_max_len)
        feed = history_feeds(hist, user_names, schema)  # HyFormer's graphs: each sequence on its own
        kv = user.run(kv_names, feed)
        ns = encode_ns(schema, req.user, req.context, req.candidates)
        for k, v in feed.items():
            arrays[f"user/{i}/{k}"] = v
        for k, v in {**ns, "s_length": hist["s_length"], **dict(zip(kv_names, kv))}.items():
            if k in scorer_inputs:
                arrays[f"scorer/{i}/{k}"] = v
        if progress:
            progress(i + 1, len(reqs))
    arrays["count"] = np.array(len(reqs))
    return arrays


def feeds(arrays: dict[str, np.ndarray], graph: str) -> list[dict[str, np.ndarray]]:
    """The feed dicts of one graph (``user`` or ``scorer``) in request order."""
    out: dict[int, dict[str, np.ndarray]] = {}
    prefix = f"{graph}/"
    for key, v in arrays.items():
        if key.startswith(prefix):
            _, i, name = key.split("/", 2)
            out.setdefault(int(i), {})[name] = np.ascontiguousarray(v)
    return [out[i] for i in sorted(out)]


class FeedReader:
    """An ONNX Runtime ``CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, feed_list: list[dict[str, np.ndarray]]):
        self._feeds = feed_list
        self._it: Iterator | None = None

    def get_next(self):
        if self._it is None:
            self._it = iter(self._feeds)
        return next(self._it, None)

    def get_first(self):
        """The first feed, without advancing (ModelOpt's test run uses it)."""
        return self._feeds[0] if self._feeds else None

    def rewind(self) -> None:
        self._it = None

    def __len__(self) -> int:
        return len(self._feeds)
