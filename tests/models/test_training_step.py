"""``train``'s step (fused training attention, foreach clip, fused AdamW) computes what the first
release's step computed (explicit attention, per-tensor clip, unfused AdamW), within float
rounding: the clipped gradients on real MovieLens batches, and the optimizer's update on the
same gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from onetrans_trt.models import attention, training
from onetrans_trt.models.checkpoint import build_model
from onetrans_trt.models.config import ModelConfig


def _clipped_grads(model, batch, y, fused: bool, monkeypatch):
    monkeypatch.setattr(attention, "FUSED_TRAINING_ATTENTION", fused)
    model.zero_grad(set_to_none=True)
    loss = nn.BCEWithLogitsLoss()(model(batch), y)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 0.05, foreach=fused)  # small: the clip does act
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", ["hyformer", "onetrans"])
def test_train_step_gradients_equal_the_first_releases(family, movielens, monkeypatch):
    from onetrans_trt.data.movielens import TASKS

    cfg = ModelConfig.from_preset("tiny", movielens.schema, family=family, tasks=list(TASKS))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    rng = np.random.default_rng(1)
    for _ in range(2):
        idx = rng.choice(len(movielens.train), 64, replace=False)
        batch = training.to_torch(movielens.batch(movielens.train, idx))
        y = torch.from_numpy(movielens.train.labels[idx])
        l_new, g_new = _clipped_grads(model, batch, y, True, monkeypatch)
        l_old, g_old = _clipped_grads(model, batch, y, False, monkeypatch)
        assert abs(l_new - l_old) <= 1e-6
        assert all((a - b).abs().max().item() <= 1e-6 for a, b in zip(g_new, g_old))
        assert torch.cat([g.flatten() for g in g_old]).norm().item() == pytest.approx(0.05, rel=1e-4)


def test_the_fused_optimizer_makes_the_unfused_update(movielens):
    from onetrans_trt.data.movielens import TASKS

    cfg = ModelConfig.from_preset("tiny", movielens.schema, family="hyformer", tasks=list(TASKS))
    torch.manual_seed(0)
    new = build_model(cfg)
    old, start = copy.deepcopy(new), copy.deepcopy(new)
    opt_new = training.optimizer(new, lr=5e-3)
    assert opt_new.defaults["fused"]
    opt_old = torch.optim.AdamW(old.parameters(), lr=5e-3, weight_decay=1e-5)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        for p, q in zip(new.parameters(), old.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt_new.step()
        opt_old.step()
    assert all((p - q).abs().max().item() <= 1e-6 for p, q in zip(new.parameters(), old.parameters()))
    assert all((p - s).abs().mean().item() > 1e-3 for p, s in zip(new.parameters(), start.parameters()))  # it moved
