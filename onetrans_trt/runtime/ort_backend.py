"""ONNX Runtime backend: the two graphs of a build directory.

CPU here; the CUDA execution provider is used when onnxruntime-gpu is installed and a GPU
is visible (``providers=`` to choose explicitly).

Sessions stop their threads' spinning when a run ends (``session.force_spinning_stop``). A
split request runs two graphs back to back; left spinning, the encoder's idle threads keep
the cores busy while the scorer's threads start, and on 2 cores an encoder + scorer request
took 1.35x the two runs' sum (onetrans-s, L=1024, C=64: 194 ms against 141 ms with the stop;
spinning within a run, which speeds each graph up, is kept). A process-wide thread pool would
do the same but would impose itself on every other ONNX Runtime session in the process.

With ``device="cuda"`` (the default when the CUDA execution provider runs the graphs) the
user's K/V never visit the host: the encoder's outputs are bound to device memory
(``io_binding().bind_output(name, "cuda")``) and handed to the scorer as the same
``OrtValue`` s (``bind_ortvalue_input``). ``device="cpu"`` runs that same code path on the CPU
(how it is tested here); ``device=None`` is the plain ``session.run`` path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from onetrans_trt.errors import BuildError, InputError
from onetrans_trt.kv import UserKV, from_state, state_arrays


def _quiet_ort() -> None:
    import onnxruntime as ort

    from onetrans_trt import log

    # errors surface as exceptions; ORT's own printing only with -v (onetrans_trt.log)
    ort.set_default_logger_severity(log.ort_severity())


def default_providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def ort_session(path: Any, providers: list[str] | None = None, threads: int | None = None,
                simulate_qdq: bool = False):
    """An ORT session on a graph file (or an in-memory ``onnx.ModelProto``); ``simulate_qdq`` runs Q/DQ
    graphs as float math (no integer kernels). A file's external data (``<file>.data``) is read by
    ONNX Runtime beside the file, whatever the working directory, after :func:`check_onnx` has
    confined it to the file's directory; an in-memory model over 2 GiB (or the external-data
    threshold) goes to ONNX Runtime through a temporary file (:func:`session_source`)."""
    import os

    from onetrans_trt.onnx_files import session_source

    if isinstance(path, (str, os.PathLike)):
        from onetrans_trt.trust import check_onnx

        path = Path(path)
        model = check_onnx(path)  # a regular file, external data confined to its directory, ops we know
        return _session_from(path, str(path), providers, threads, simulate_qdq, _fast_int8(model))
    fast = _fast_int8(path)
    with session_source(path) as source:
        return _session_from(Path("<in-memory model>"), source, providers, threads, simulate_qdq, fast)


def _fast_int8(model) -> bool:
    """A graph whose INT8 weights are marked 7-bit (the CPU INT8 variant) runs ORT's fast integer
    kernels as they are: they cannot saturate on it (``onetrans_trt/calibrate/int8_cpu.py``)."""
    from onetrans_trt.ort_options import int8_weights_cannot_saturate

    return int8_weights_cannot_saturate(model)


def _session_from(path: Path, source, providers, threads, simulate_qdq, fast_int8: bool = False):
    import onnxruntime as ort

    _quiet_ort()
    from onetrans_trt.ort_options import session_options

    opts = session_options(severity=4, threads=threads, simulate_qdq=simulate_qdq, exact_int8=not fast_int8)
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=providers or default_providers())
    except Exception as e:  # noqa: BLE001 - ORT raises its own untyped errors
        raise BuildError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None


def graph_session(path: Path, providers: list[str] | None = None, threads: int | None = None):
    """``(session, note)``: a session that can run the graph. ORT's CPU integer kernels reject
    per-channel zero points on batched (3-D) weights; such Q/DQ graphs then run as simulated
    quantization (exactly TensorRT's arithmetic, without the integer speed-up), and ``note``
    says so (else it is empty)."""
    from onetrans_trt.graphs.flops import placeholder_feeds
    from onetrans_trt.onnx_files import load_model

    path = Path(path)
    sess = ort_session(path, providers, threads)
    model = load_model(path, external=False)  # nodes and inputs only: the weights are ORT's
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return sess, ""
    sizes = {d.dim_param: 2 for v in model.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    try:
        import onnxruntime as ort

        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # the failure is expected here and handled below
        sess.run(None, placeholder_feeds(model, {**sizes, "history": 2}), quiet)
        return sess, ""
    except Exception as e:  # noqa: BLE001 - ORT raises untyped errors
        note = f"{path.name}: integer kernels unavailable ({str(e).split('Status Message:')[-1][:80].strip()}); simulated Q/DQ"
        return ort_session(path, providers, threads, simulate_qdq=True), note


class OrtSplitBackend:
    """``user_encoder.onnx`` once per request, ``candidate_scorer.onnx`` per chunk."""

    split = True

    def __init__(self, build: str | Path, *, name: str = "ort", user_graph: str = "user_encoder.onnx",
                 scorer_graph: str = "candidate_scorer.onnx", providers: list[str] | None = None,
                 threads: int | None = None, device: str | None = "auto"):
        build = Path(build)
        self.name = name
        self.note = ""
        self.user = self._session(build / user_graph, providers, threads)
        self.scorer = self._session(build / scorer_graph, providers, threads)
        self.user_inputs = [i.name for i in self.user.get_inputs()]
        self.kv_names = [o.name for o in self.user.get_outputs()]
        self.scorer_inputs = [i.name for i in self.scorer.get_inputs()]
        self.kv_dtype = {i.name: i.type for i in self.scorer.get_inputs()}
        if device == "auto":
            device = "cuda" if self.scorer.get_providers()[0] == "CUDAExecutionProvider" else None
        if device not in (None, "cpu", "cuda"):
            raise InputError(f"device {device!r}: choose 'cpu', 'cuda', 'auto' or None")
        self.device = device
        out_types = {o.name: o.type for o in self.user.get_outputs()}
        # the K/V can stay where the encoder wrote them only if the scorer reads them in the same dtype
        self.bind_state = device is not None and all(out_types[n] == self.kv_dtype.get(n, out_types[n])
                                                     for n in self.kv_names)

    def _session(self, path: Path, providers, threads):
        sess, note = graph_session(path, providers, threads)
        if note:
            self.note = note
        return sess

    def encode_user(self, hist: dict[str, np.ndarray]) -> UserKV:
        from onetrans_trt.data.requests import history_feeds

        missing = [n for n in self.user_inputs if n not in hist]
        if missing and "s_type" in hist:  # a merged stream for a graph reading each sequence on its own
            hist = {**hist, **history_feeds(hist, self.user_inputs)}
            missing = [n for n in self.user_inputs if n not in hist]
        if missing:
            raise InputError(f"user encoder inputs missing: {missing}")
        if self.device is None:
            outs = self.user.run(self.kv_names, {n: hist[n] for n in self.user_inputs})
        else:
            binding = self.user.io_binding()
            for n in self.user_inputs:
                binding.bind_cpu_input(n, np.ascontiguousarray(hist[n]))
            for n in self.kv_names:
                binding.bind_output(n, self.device)  # allocated by ORT on the device, kept there
            self.user.run_with_iobinding(binding)
            outs = binding.get_outputs()
            if not self.bind_state:
                outs = [o.numpy() for o in outs]
        return from_state(dict(zip(self.kv_names, outs)), np.asarray(hist["s_length"]) if "s_length" in hist else None)

    def score(self, kv: UserKV, ns: dict[str, np.ndarray]) -> np.ndarray:
        state = state_arrays(kv)
        if self.device is not None:
            return self._score_bound(kv, state, ns)
        feeds = {}
        for name in self.scorer_inputs:
            if name == "s_length":
                feeds[name] = np.asarray(kv.lengths, dtype=np.int64).reshape(-1)[:1]
            elif name in state:
                x = np.asarray(state[name])
                if self.kv_dtype[name] in ("tensor(float16)", "tensor(float)"):
                    want = np.float16 if self.kv_dtype[name] == "tensor(float16)" else np.float32
                    x = x if x.dtype == want else x.astype(want)
                feeds[name] = x
            else:
                feeds[name] = ns[name]
        return self.scorer.run(["logits"], feeds)[0]

    def _score_bound(self, kv: UserKV, state: dict, ns: dict[str, np.ndarray]) -> np.ndarray:
        """The scorer over the user's state as bound ``OrtValue`` s: no host round trip."""
        import onnxruntime as ort

        binding = self.scorer.io_binding()
        for name in self.scorer_inputs:
            if name == "s_length":
                binding.bind_cpu_input(name, np.asarray(kv.lengths, dtype=np.int64).reshape(-1)[:1])
            elif name in state:
                x = state[name]
                if isinstance(x, ort.OrtValue):
                    binding.bind_ortvalue_input(name, x)
                else:
                    want = np.float16 if self.kv_dtype[name] == "tensor(float16)" else np.float32
                    x = np.asarray(x)
                    binding.bind_cpu_input(name, np.ascontiguousarray(x if x.dtype == want or x.dtype.kind != "f"
                                                                      else x.astype(want)))
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(ns[name]))
        binding.bind_output("logits", "cpu")  # [C, tasks]: the only thing that returns to the host
        self.scorer.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


class OrtUnifiedBackend:
    """``unified.onnx``: the naive export, whole sequence per candidate."""

    split = False

    def __init__(self, build: str | Path, *, name: str = "ort-unified", providers: list[str] | None = None,
                 threads: int | None = None):
        self.name = name
        self.sess = ort_session(Path(build) / "unified.onnx", providers, threads)
        self.inputs = [i.name for i in self.sess.get_inputs()]

    def score_unified(self, hist: dict[str, np.ndarray], ns: dict[str, np.ndarray]) -> np.ndarray:
        from onetrans_trt.data.requests import history_feeds

        c = next(iter(ns.values())).shape[0]
        hist = history_feeds(hist, [n for n in self.inputs if n not in ns])  # (HyFormer: split sequences)
        feeds = {n: (np.repeat(hist[n], c, axis=0) if n in hist else ns[n]) for n in self.inputs}
        return self.sess.run(["logits"], feeds)[0]
