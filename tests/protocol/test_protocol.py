"""The split protocol on models written outside this package (examples/), and on ours."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from onetrans_trt.errors import ConfigError
from onetrans_trt.protocol import ProtocolError, SplitSpec, check_protocol, random_inputs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GOOD = ["fused_qkv_cls", "sep_pyramid", "hyformer_style"]


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"ex_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", GOOD)
def test_example_models_keep_the_protocol(name):
    mod = example(name)
    rep = check_protocol(mod.factory(), SplitSpec.parse(mod.SPEC), mod.example_inputs())
    assert rep["ok"] and rep["max_abs"] < 1e-5 and rep["state_checked"] == "unified_state"
    assert len(rep["cases"]) == 5 and {c["candidates"] for c in rep["cases"]} >= {1, 3, 17}


def test_a_user_side_that_sees_the_candidates_is_refused_naming_the_state():
    mod = example("bad_models")
    with pytest.raises(ProtocolError, match=r"user state 'k1' .* the user side sees the candidates"):
        check_protocol(mod.leaky_factory(), SplitSpec.parse(mod.LEAKY_SPEC))


def test_interacting_candidates_are_refused():
    mod = example("bad_models")
    spec = getattr(mod, "INTERACTING_SPEC", mod.SPEC)
    with pytest.raises(ProtocolError, match="candidates interact: changing candidate"):
        check_protocol(mod.interacting_factory(), SplitSpec.parse(spec))


def test_our_onetrans_is_one_implementation_of_the_protocol():
    from onetrans_trt.data.synthetic import synthetic_schema
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.onetrans import OneTrans
    from onetrans_trt.protocol import ours_as_protocol
    from tests.helpers import randomize

    model = ours_as_protocol(randomize(OneTrans(ModelConfig.from_preset("tiny", synthetic_schema(max_history=12))), 3))
    rep = check_protocol(model, model.spec())
    assert rep["max_abs"] < 1e-5 and rep["state_checked"].startswith("split == unified only")


def test_random_inputs_follow_the_spec_padding_and_lengths():
    spec = SplitSpec.parse(example("fused_qkv_cls").SPEC)
    user, cand = random_inputs(spec, users=3, candidates=5, lengths=[0, 2, spec.history.max + 5],
                               rng=np.random.default_rng(0))
    hl = spec.history_length.name
    assert user[hl].tolist() == [0, 2, spec.history.max + 5]
    for i in spec.side("user"):
        if "history" in i.shape:
            x = user[i.name]
            ax = i.shape.index("history")
            rows = x.movedim(ax, 1).reshape(3, spec.history.max, -1).abs().sum(-1)
            assert rows[0].sum() == 0  # an empty history is all padding
            if spec.history.padding == "left":
                assert rows[1][:-2].sum() == 0
    assert all(v.shape[0] == 5 for v in cand.values())


@pytest.mark.parametrize("bad,msg", [
    ({"inputs": []}, "at least one user input"),
    ({"state": [{"name": "k0", "kind": "key", "layer": 0}]}, "need both a key and a value"),
    ({"inputs": [{"name": "x", "side": "user", "dtype": "int64", "shape": ["candidates"]}]}, "first dimension"),
    ({"tasks": []}, "tasks"),
    ({"history": {"max": 0}}, "history.max"),
])
def test_bad_specs_are_one_clear_config_error(bad, msg):
    base = dict(example("fused_qkv_cls").SPEC)
    with pytest.raises(ConfigError, match=msg):
        SplitSpec.parse({**base, **bad})


def test_check_only_cli_refuses_a_leaky_model_in_one_line():
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "export", "--module",
                        f"{EXAMPLES / 'bad_models.py'}:leaky_factory", "--check-only"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    errs = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errs) == 1 and "'k1'" in errs[0]
