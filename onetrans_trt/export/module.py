"""``export --module``: a ranker written outside this package becomes a build directory.

The module follows the split protocol (``onetrans_trt.protocol``) and comes with a
:class:`~onetrans_trt.protocol.SplitSpec`. ``export_module`` proves the split first (unless
told not to), then traces the two serving graphs directly from the protocol's methods:

- ``user_encoder.onnx``: the user inputs (batched over ``users``) -> the named state, K/V
  renamed ``user_k_<i>``/``user_v_<i>`` and the rest ``user_<name>``;
- ``candidate_scorer.onnx``: the candidates' inputs plus ONE user's state -> ``logits``,
  ``probs``; each K/V's length axis is the dynamic ``kv_len_<i>``;

runs the scorer passes (``shared-prefix`` rewrites a naive per-candidate K/V copy into our
fused op, ``no-broadcast`` then proves no copy is left, ``cleanup``), writes ``unified.onnx``
(the module's own forward) when asked, samples and a manifest. Loading a module runs its
author's code: that is what ``--module`` means.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onetrans_trt.errors import BuildError, InputError
from onetrans_trt.io import atomic_directory, atomic_write_json, locks_build
from onetrans_trt.protocol import SplitSpec, check_protocol, random_inputs, unified_inputs
from onetrans_trt.protocol.checks import user_slice
from onetrans_trt.trust import DEFAULT_OPSET, check_opset

SPEC_FILE = "spec.json"
SCORER_PASSES = ["shared-prefix", "no-broadcast", "cleanup"]
USER_PASSES = ["cleanup"]


# ---------------------------------------------------------------- loading a user's module

def load_factory(ref: str) -> Callable[[], Any]:
    """``path/to/file.py:factory`` or ``package.module:factory`` -> the factory callable."""
    if ":" not in ref:
        raise InputError(f"--module {ref!r}: expected FILE.py:FACTORY or package.module:FACTORY")
    where, name = ref.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise InputError(f"--module {ref!r}: {path} is not a file")
        mod_name = f"onetrans_user_module_{zlib.crc32(str(path.resolve()).encode()):08x}"  # stable per file
        spec = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        try:
            spec.loader.exec_module(mod)  # the user's own code: --module runs it
        except Exception as e:  # noqa: BLE001 - their code may raise anything
            raise InputError(f"--module {ref!r}: importing {path} failed: {type(e).__name__}: {str(e)[:200]}") from None
    else:
        try:
            mod = importlib.import_module(where)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"--module {ref!r}: cannot import {where} ({type(e).__name__}: {str(e)[:200]})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise InputError(f"--module {ref!r}: {where} has no callable {name!r}")
    return fn


def load_user_module(ref: str, weights: str | Path | None = None, spec_path: str | Path | None = None):
    """``(module, spec, source)`` for ``--module REF [--weights FILE] [--spec FILE]``; without
    ``--spec`` the factory's Python module must define ``SPEC``."""
    import torch

    factory = load_factory(ref)
    try:
        module = factory()
    except Exception as e:  # noqa: BLE001 - the user's code
        raise InputError(f"--module {ref!r}: the factory raised {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"--module {ref!r}: the factory returned {type(module).__name__}, not a torch.nn.Module")
    if spec_path is not None:
        spec = SplitSpec.from_file(spec_path)
    else:
        raw = getattr(sys.modules.get(getattr(factory, "__module__", ""), None), "SPEC", None)
        if raw is None:
            raise InputError(f"--module {ref!r}: give --spec FILE (its module defines no SPEC)")
        spec = SplitSpec.parse(raw, f"{ref} SPEC")
    source = {"module": ref, "weights": load_weights(module, weights) if weights is not None else None}
    return module.eval(), spec, source


def load_weights(module, path: str | Path) -> dict[str, Any]:
    """Load a state dict into ``module``: safetensors, or a PyTorch file read with
    ``torch.load(weights_only=True)`` (never a pickle of code). bf16/fp16/fp32 accepted."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"--weights {path}: not a readable safetensors file ({str(e)[:160]})") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a pickle with code is refused here
            raise InputError(f"--weights {path}: cannot be read as plain tensors with torch.load(weights_only=True) "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"--weights {path}: expected a mapping of parameter names to tensors")
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    bad = [d for d in dtypes if d not in ("float32", "float16", "bfloat16", "int64", "int32", "bool")]
    if bad:
        raise InputError(f"--weights {path}: unsupported tensor dtypes {bad}")
    want = module.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise InputError(f"--weights {path}: does not match the module: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise InputError(f"--weights {path}: {k} has shape {tuple(v.shape)}, the module {tuple(want[k].shape)}")
    module.load_state_dict({k: v.to(want[k].dtype) if v.is_floating_point() else v for k, v in sd.items()})
    return {"path": str(path.resolve()), "dtypes": dtypes, "tensors": len(sd)}


def load_inputs(path: str | Path, spec: SplitSpec) -> tuple[dict, dict]:
    """Example inputs from an ``.npz`` holding every spec input by name (user inputs batched by
    users, candidate inputs by candidates)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--inputs {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise InputError(f"--inputs {path}: not a readable .npz of plain arrays ({str(e)[:160]})") from None
    missing = [i.name for i in spec.inputs if i.name not in arrays]
    if missing:
        raise InputError(f"--inputs {path}: missing {missing}; it must hold every input the spec names")
    out: tuple[dict, dict] = ({}, {})
    for i in spec.inputs:
        a = arrays[i.name]
        if str(a.dtype) != i.dtype and not (i.dtype == "bfloat16" and a.dtype == np.float32):
            raise InputError(f"--inputs {path}: {i.name} is {a.dtype}, the spec says {i.dtype}")
        if a.ndim != len(i.shape) or any(isinstance(d, int) and d != n for d, n in zip(i.shape, a.shape)):
            raise InputError(f"--inputs {path}: {i.name} has shape {a.shape}, the spec says {i.shape}")
        out[0 if i.side == "user" else 1][i.name] = torch.from_numpy(np.ascontiguousarray(a))
    return out


# ---------------------------------------------------------------- the two graphs

def _graph(module, names: list[str], outputs: list[str], body: Callable):
    """A traceable module: one positional parameter per input name (what torch.export maps
    dynamic shapes by), ``body(model, tensors) -> outputs``."""
    import torch

    from onetrans_trt.export.serving import _named_forward

    class ProtocolGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = module
            self.input_names, self.output_names = names, outputs
            _named_forward(self, names)

        def _forward(self, tensors):
            return body(self.model, tensors)

    return ProtocolGraph()


def _user_graph(module, spec: SplitSpec):
    """User inputs -> the state in spec order, named as the graph passes expect."""
    names = [i.name for i in spec.side("user")]

    def body(model, tensors):
        state = model.encode_user(dict(zip(names, tensors)))
        return tuple(state[s.name] for s in spec.state)

    return _graph(module, names, [spec.graph_name(s.name) for s in spec.state], body)


def _scorer_graph(module, spec: SplitSpec):
    """Candidate inputs + one user's state -> logits, probs."""
    import torch

    cand = [i.name for i in spec.side("candidate")]

    def body(model, tensors):
        state = {s.name: t for s, t in zip(spec.state, tensors[len(cand):])}
        logits = model.score_candidates(state, dict(zip(cand, tensors[:len(cand)])))
        return logits, torch.sigmoid(logits)

    return _graph(module, cand + [spec.graph_name(s.name) for s in spec.state], ["logits", "probs"], body)


def _unified_graph(module, spec: SplitSpec):
    """The module's own forward: every input batched per candidate."""
    import torch

    names = [i.name for i in spec.inputs]

    def body(model, tensors):
        logits = model(dict(zip(names, tensors)))
        return logits, torch.sigmoid(logits)

    return _graph(module, names, ["logits", "probs"], body)


def _dynamic(spec: SplitSpec, side: str) -> dict[str, dict[int, str]]:
    out = {}
    for i in spec.inputs:
        if side == "unified" or i.side == side:
            axes = {a: (d if not (side == "unified" and d == "users") else "candidates")
                    for a, d in enumerate(i.shape) if isinstance(d, str)}
            out[i.name] = axes
    return out


def _state_dims(spec: SplitSpec) -> dict[str, dict[int, str]]:
    """The scorer's state inputs: one user (batch 1, static); each K/V's length axis dynamic."""
    out = {}
    for s in spec.state:
        if s.kind != "other":
            out[spec.graph_name(s.name)] = {spec.kv_axis(s.name): f"kv_len_{spec.kv_layers.index(s.layer)}"}
    return out


def _kv_lengths(spec: SplitSpec, state: dict) -> dict[str, int]:
    return {f"kv_len_{spec.kv_layers.index(s.layer)}": int(state[s.name].shape[spec.kv_axis(s.name)])
            for s in spec.state if s.kind == "key"}


def _model_facts(spec: SplitSpec, state: dict) -> dict[str, Any]:
    keys = [state[s.name] for s in spec.state if s.kind == "key"]
    if keys:
        k, s0 = keys[0], next(s for s in spec.state if s.kind == "key")
        heads, dh = (k.shape[1], k.shape[3]) if s0.layout == "BHLD" else (k.shape[2], k.shape[3])
    else:
        heads, dh = 1, 1
    return {"family": "module", "preset": spec.name, "d_model": int(heads * dh), "n_heads": int(heads),
            "head_dim": int(dh), "n_layers": max(1, len(spec.kv_layers)), "tasks": list(spec.tasks),
            "max_history": spec.history.max, "s_max_len": spec.history.max}


# ---------------------------------------------------------------- export

@locks_build("export", arg="out")
def export_module(module, spec: SplitSpec | dict, example: tuple[dict, dict] | None, out: str | Path, *,
                  opset: int = DEFAULT_OPSET, check: bool = True, unified: bool = False, force: bool = False,
                  source: dict[str, Any] | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prove the split (``check``), trace both graphs, run the passes, write the build.

    ``example``: ``(user_inputs, candidate_inputs)`` as torch tensors (user inputs batched over
    users); random inputs from the spec when None. ``source``: what the module and weights were
    (recorded in the manifest)."""
    import onnx_graphsurgeon as gs
    import torch

    from onetrans_trt.export.api import CANDIDATE_SCORER, MANIFEST, UNIFIED, USER_ENCODER, _made_by, _save_graph, _versions, \
        graph_entry, trace_onnx
    from onetrans_trt.graphs import run_passes
    from onetrans_trt import onnx_files

    say = progress or (lambda msg: None)
    spec = SplitSpec.parse(spec)
    out = Path(out)
    if out.exists() and not force:
        raise BuildError(f"{out} already exists; pass --force to replace it")
    check_opset(opset)  # before any work: a build at an opset nothing here loads is never written
    params = list(module.parameters())
    weight_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    module = module.float().eval()  # export and prove in fp32, whatever the weights were stored in
    report = None
    if check:
        say("protocol checks")
        report = check_protocol(module, spec, example, progress=say)
    rng = np.random.default_rng(0)
    # trace on sizes >= 2 on every dynamic axis: 2 users with full histories, 3 candidates
    tu, tc = random_inputs(spec, users=2, candidates=3, lengths=spec.history.max, rng=rng)
    with torch.no_grad():
        state = module.encode_user(tu)
    one = user_slice(state, 0)
    with atomic_directory(out, force=force) as tmp:
        say("trace user encoder")
        trace_onnx(_user_graph(module, spec), tu, tmp / USER_ENCODER, opset, _dynamic(spec, "user"))
        say("trace candidate scorer")
        feeds = {**tc, **{spec.graph_name(k): v for k, v in one.items()}}
        trace_onnx(_scorer_graph(module, spec), feeds, tmp / CANDIDATE_SCORER, opset,
                   {**_dynamic(spec, "candidate"), **_state_dims(spec)})
        records = []
        say("graph passes")
        from onetrans_trt.graphs import available_passes

        scorer_passes = [p for p in SCORER_PASSES if p in available_passes()]
        # one graph at a time, rewritten in place; tensors of ON_DISK_BYTES or more (embedding
        # tables) are never read into this process: they stay in the traced graph's data file
        # and are copied from there into the rewritten graph's
        big = onnx_files.ON_DISK_BYTES
        ue, r1 = run_passes(gs.import_onnx(onnx_files.load_model(tmp / USER_ENCODER, on_disk_above=big)),
                            USER_PASSES, graph_name="user_encoder")
        _save_graph(ue, tmp / USER_ENCODER)
        del ue
        try:
            cs, r2 = run_passes(gs.import_onnx(onnx_files.load_model(tmp / CANDIDATE_SCORER, on_disk_above=big)),
                                scorer_passes, graph_name="candidate_scorer")
        except BuildError as e:
            raise BuildError(f"the candidate scorer copies the user's K/V per candidate and the copy could not be "
                             f"rewritten into one shared read: {e}") from None
        _save_graph(cs, tmp / CANDIDATE_SCORER)
        del cs
        records += r1 + r2
        if unified:
            say("trace unified graph")
            trace_onnx(_unified_graph(module, spec), unified_inputs(tu, tc, 0), tmp / UNIFIED, opset,
                       _dynamic(spec, "unified"))
        say("samples")
        samples = _write_samples(module, spec, example or (tu, tc), tmp / "samples",
                                 "given example inputs" if example else "random inputs from the spec")
        graphs = {}
        for key, fname in (("user_encoder", USER_ENCODER), ("candidate_scorer", CANDIDATE_SCORER)) + \
                ((("unified", UNIFIED),) if unified else ()):
            graphs[key] = graph_entry(tmp, fname)
        kv_len = _kv_lengths(spec, one)
        dims = {d: dict(zip(("min", "typical", "max"), spec.dim_range(d))) for d in ("users", "candidates", "history")}
        dims.update({k: {"min": 1, "typical": n, "max": n} for k, n in kv_len.items()})
        manifest = {
            "format": "onetrans-trt/build/1",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": {"module": (source or {}).get("module", type(module).__name__),
                           "weights": (source or {}).get("weights"), "weight_dtypes": weight_dtypes},
            "versions": _versions(),
            "provenance": _made_by(),
            "opset": opset,
            "model": _model_facts(spec, one),
            "pyramid": {"schedule": None, "mode": "module"},
            "graphs": graphs,
            "dynamic_dims": dims,
            "passes": records,
            "samples": samples,
            "protocol": {"spec": spec.to_json(), "checks": report or {"ok": None, "skipped": True}},
        }
        atomic_write_json(tmp / SPEC_FILE, spec.to_json())
        atomic_write_json(tmp / MANIFEST, manifest)
    say("done")
    return manifest


def _write_samples(module, spec: SplitSpec, example: tuple[dict, dict], out: Path, source: str) -> dict[str, Any]:
    """The example inputs, the state and both forwards' logits (user 0), as npz."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    user, cand = example
    with torch.no_grad():
        state = module.encode_user(user)
        split = module.score_candidates(user_slice(state, 0), cand)
        uni = module(unified_inputs(user, cand, 0))
    arrays = {f"inputs/{k}": v.numpy() for k, v in {**user, **cand}.items()}
    arrays.update({f"state/{spec.graph_name(k)}": v[0:1].float().numpy() for k, v in state.items()})
    arrays["logits"], arrays["unified_logits"] = split.numpy(), uni.numpy()
    np.savez(out / "samples.npz", **arrays)
    return {"count": 1, "files": ["samples.npz"], "source": source}


def check_only(module, spec: SplitSpec | dict, example=None, progress=None) -> dict[str, Any]:
    """``export --check-only``: the proofs alone, in fp32."""
    return check_protocol(module.float().eval(), SplitSpec.parse(spec), example, progress=progress)
