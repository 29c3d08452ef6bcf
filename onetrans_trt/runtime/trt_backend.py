"""TensorRT backend (GPU servers): binds the two engines of ``BUILD/engines/<precision>/``.

The user's K/V stay on the device: the user encoder writes them into CUDA tensors that
the scorer reads by address, with no host round trip. Uses the TensorRT 11 runtime API
(``Runtime.deserialize_cuda_engine``, ``create_execution_context``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) and torch for device memory and streams.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onetrans_trt import log
from onetrans_trt.errors import BuildError, InputError, MissingCapabilityError
from onetrans_trt.kv import UserKV, from_state, state_arrays


class TrtSplitBackend:
    split = True

    def __init__(self, build: str | Path, precision: str = "fp32"):
        from onetrans_trt.plugins import register_trt_plugins
        from onetrans_trt.plugins._trt import require_tensorrt

        trt, _ = require_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise MissingCapabilityError("backend 'trt' needs a CUDA GPU")
        register_trt_plugins()
        self.name = f"trt-{precision}"
        self.trt, self.torch = trt, torch
        d = Path(build) / "engines" / precision
        runtime = trt.Runtime(trt.Logger(getattr(trt.Logger, log.trt_severity_name())))
        self.engines, self.contexts = {}, {}
        for role in ("user_encoder", "candidate_scorer"):
            path = d / f"{role}.engine"
            if not path.is_file():
                raise BuildError(f"{path}: missing; run `onetrans-trt build {build} --precision {precision}`")
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BuildError(f"{path}: TensorRT cannot deserialize it (built for another GPU or version?)")
            self.engines[role] = engine
            self.contexts[role] = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.device = "cuda"

    def _io(self, role: str):
        e = self.engines[role]
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        inputs = [n for n in names if e.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        return inputs, [n for n in names if n not in inputs]

    def _run(self, role: str, feeds: dict) -> dict:
        torch, trt = self.torch, self.trt
        ctx, engine = self.contexts[role], self.engines[role]
        inputs, outputs = self._io(role)
        keep = []
        for name in inputs:
            x = feeds[name]
            t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
            t = t.to(self.device, dtype=getattr(torch, np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name)).contiguous()
            keep.append(t)
            if not ctx.set_input_shape(name, tuple(t.shape)):  # False: outside the engine's profile
                raise InputError(f"{role}: input {name} has shape {tuple(t.shape)}, outside the engine's optimization "
                                 f"profile {_profile(engine, name)}; rebuild with `onetrans-trt build --profile ...`")
            ctx.set_tensor_address(name, t.data_ptr())
        out = {}
        for name in outputs:
            dtype = getattr(torch, np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name)
            out[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device=self.device)
            ctx.set_tensor_address(name, out[name].data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream if self.stream is not None else 0):
            raise BuildError(f"TensorRT failed to run the {role} engine")
        if self.stream is not None:
            self.stream.synchronize()
        return out

    def encode_user(self, hist: dict[str, np.ndarray]) -> UserKV:
        from onetrans_trt.data.requests import history_feeds

        out = self._run("user_encoder", history_feeds(hist, self._io("user_encoder")[0]))
        return from_state(out, np.asarray(hist["s_length"]))  # by name: K/V slots in order, then extras

    def score(self, kv: UserKV, ns: dict[str, np.ndarray]) -> np.ndarray:
        feeds = dict(ns)
        feeds["s_length"] = np.asarray(kv.lengths, dtype=np.int64).reshape(-1)[:1]
        for name, t in state_arrays(kv).items():
            feeds[name] = t[:1]  # device tensors, no copy
        wanted = set(self._io("candidate_scorer")[0])
        feeds = {k: v for k, v in feeds.items() if k in wanted}
        return self._run("candidate_scorer", feeds)["logits"].float().cpu().numpy()


def _profile(engine, name: str) -> str:
    """``min..max`` of an input in profile 0 (``get_tensor_profile_shape``), for error messages."""
    try:
        lo, _, hi = engine.get_tensor_profile_shape(name, 0)
        return f"{tuple(lo)}..{tuple(hi)}"
    except Exception:  # noqa: BLE001 - only for the message
        return "(unknown)"
