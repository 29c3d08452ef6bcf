"""`export --module`: three rankers written in other styles than ours export, and ONNX Runtime
scores equal each module's own unified forward within 1e-4 on 50 cases each (histories 0, 1,
full and over-long; 1..300 candidates)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from onetrans_trt.errors import BuildError, InputError
from onetrans_trt.export.module import export_module, load_user_module
from onetrans_trt.protocol import SplitSpec
from onetrans_trt.validate.module import validate_module_build
from tests.protocol.test_protocol import EXAMPLES, example

pytestmark = pytest.mark.heavy  # three exports and 150 validation cases: make test-heavy


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("modules")
    for name in ("fused_qkv_cls", "sep_pyramid", "hyformer_style"):
        mod = example(name)
        out[name] = (mod, root / name)
        export_module(mod.factory(), mod.SPEC, mod.example_inputs(), root / name, unified=True)
    return out


@pytest.mark.parametrize("name", ["fused_qkv_cls", "sep_pyramid", "hyformer_style"])
def test_examples_export_and_ort_equals_the_unified_forward(builds, name):
    mod, build = builds[name]
    rep = validate_module_build(build, mod.factory(), count=50)
    assert rep["cases"] >= 50 and rep["max_abs"] <= 1e-4
    spec = SplitSpec.parse(mod.SPEC)
    hmax = spec.history.max
    seen = {r["case"].split(",")[0] for r in rep["rows"]}
    assert {"history 0", "history 1", f"history {hmax}", f"history {hmax + 7}"} <= seen
    assert max(r["candidates"] for r in rep["rows"]) == 300 and min(r["candidates"] for r in rep["rows"]) == 1
    # the unified graph (the module's own forward) matches the samples the export wrote
    with np.load(build / "samples" / "samples.npz") as z:
        np.testing.assert_allclose(z["logits"], z["unified_logits"], atol=1e-5)


def test_the_naive_scorer_comes_out_with_no_kv_copy(builds):
    import onnx_graphsurgeon as gs

    from onetrans_trt.graphs.no_broadcast import kv_broadcasts

    _, build = builds["sep_pyramid"]
    g = gs.import_onnx(onnx.load(str(build / "candidate_scorer.onnx")))
    assert kv_broadcasts(g) == []
    assert sum(n.op == "SharedPrefixAttention" for n in g.nodes) >= 1


def test_manifest_records_the_protocol_and_the_kv(builds):
    import json

    mod, build = builds["hyformer_style"]
    m = json.loads((build / "manifest.json").read_text())
    assert m["model"]["family"] == "module" and m["protocol"]["checks"]["ok"]
    spec = SplitSpec.parse(mod.SPEC)
    scorer_inputs = [i["name"] for i in m["graphs"]["candidate_scorer"]["inputs"]]
    for s in spec.state:
        assert spec.graph_name(s.name) in scorer_inputs
    assert all(k in m["dynamic_dims"] for k in ("users", "candidates", "history", "kv_len_0"))


def test_bf16_weights_through_the_cli(tmp_path):
    """A user's bf16 safetensors checkpoint: read, cast to fp32, proven and exported."""
    from safetensors.torch import save_file

    mod = example("fused_qkv_cls")
    model = mod.factory()
    torch.manual_seed(5)
    sd = {k: (torch.randn_like(v) * 0.2).to(torch.bfloat16) if v.is_floating_point() else v
          for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    ref = f"{EXAMPLES / 'fused_qkv_cls.py'}:factory"
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "export", "--module", ref, "--weights",
                        str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    import json

    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["checkpoint"]["weights"]["dtypes"] == ["bfloat16"]
    loaded, _, _ = load_user_module(ref, tmp_path / "w.safetensors")
    first = next(k for k, v in sd.items() if v.is_floating_point())
    assert torch.equal(loaded.state_dict()[first], sd[first].float())  # bf16 -> fp32 is exact
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "validate", str(tmp_path / "b"), "--count", "8"],
                       capture_output=True, text=True)  # the manifest names the module and its weights
    assert p.returncode == 0 and "verdict: PASS" in p.stdout, p.stderr[-2000:]


def test_weights_are_never_unpickled_as_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "w.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(InputError, match="weights_only=True"):
        load_user_module(f"{EXAMPLES / 'fused_qkv_cls.py'}:factory", tmp_path / "w.pt")


@pytest.mark.parametrize("ref,msg", [("nofactory", "FILE.py:FACTORY"), ("/nope.py:f", "is not a file"),
                                     (f"{EXAMPLES / 'fused_qkv_cls.py'}:nothing", "no callable 'nothing'")])
def test_bad_module_references(ref, msg):
    with pytest.raises(InputError, match=msg):
        load_user_module(ref)


def test_an_existing_build_is_not_replaced_without_force(builds):
    mod, build = builds["fused_qkv_cls"]
    with pytest.raises(BuildError, match="already exists"):
        export_module(mod.factory(), mod.SPEC, None, build)
