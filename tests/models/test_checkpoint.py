"""Checkpoints load without unpickling and fail with one clear line when damaged."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from onetrans_trt.data.synthetic import synthetic_schema
from onetrans_trt.errors import CheckpointError
from onetrans_trt.models.checkpoint import load_checkpoint, save_checkpoint
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.onetrans import OneTrans


@pytest.fixture()
def ckpt(tmp_path):
    cfg = ModelConfig.from_preset("tiny", synthetic_schema(max_history=8))
    torch.manual_seed(0)
    model = OneTrans(cfg)
    return save_checkpoint(model, tmp_path / "ck"), model


def test_round_trip_is_exact(ckpt):
    path, model = ckpt
    loaded = load_checkpoint(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.cfg.to_dict() == model.cfg.to_dict()


def test_refuses_to_overwrite_without_force(ckpt):
    path, model = ckpt
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(model, path)
    save_checkpoint(model, path, force=True)
    assert load_checkpoint(path) is not None
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_truncated_weights(ckpt):
    path, _ = ckpt
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_corrupt_header(ckpt):
    path, _ = ckpt
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[10:20] = b"\xff" * 10
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_pickle_renamed_to_safetensors_is_refused_without_unpickling(ckpt, tmp_path):
    path, _ = ckpt
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "model.safetensors").write_bytes(pickle.dumps({"x": Payload()}))
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    shutil.copy(tmp_path / "evil.pt", path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a safetensors file|corrupt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_mismatched_config(ckpt):
    path, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    cfg["d_model"] = 32
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape|do not match"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage,needle", [
    (lambda p: (p / "config.json").unlink(), "missing config.json"),
    (lambda p: (p / "model.safetensors").unlink(), "missing model.safetensors"),
    (lambda p: (p / "config.json").write_text("{oops"), "not valid JSON"),
    (lambda p: (p / "config.json").write_text('{"schema": {}, "bogus": 1}'), "unknown keys"),
    (lambda p: (p / "config.json").write_text('{"schema": {"tables": []}}'), "malformed"),
    (lambda p: (p / "model.safetensors").write_bytes(b"abc"), "truncated"),
])
def test_damaged_directory(ckpt, damage, needle):
    path, _ = ckpt
    damage(path)
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(path)


def test_nan_weights_are_refused(ckpt):
    from safetensors.torch import load_file, save_file

    path, _ = ckpt
    state = load_file(str(path / "model.safetensors"))
    name = next(iter(state))
    state[name][0] = float("nan")
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_float64_tensor_is_refused(ckpt):
    from safetensors.numpy import save_file

    path, _ = ckpt
    save_file({"x": np.zeros(3)}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="float32"):
        load_checkpoint(path)
