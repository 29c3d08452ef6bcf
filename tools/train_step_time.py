"""Time HyFormer training steps side by side: several configs on the same MovieLens batches,
interleaved round by round in one process, so the ratio is not a comparison across runs.

    .venv/bin/python tools/train_step_time.py --steps 20 [--profile NAME]

Each step is what ``train_model`` does per batch: forward, BCE, backward, clip, AdamW step.
Prints seconds per step (median over rounds) and each config's speed-up over the first."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch import nn

from onetrans_trt.data.movielens import TASKS, MovieLens
from onetrans_trt.models.checkpoint import build_model
from onetrans_trt.models.config import HYFORMER_WAVE1, ModelConfig
from onetrans_trt.models.training import to_torch


def contenders(ml: MovieLens) -> dict[str, ModelConfig]:
    hy = dict(family="hyformer", tasks=list(TASKS))
    schema = ml.schema
    caps = ml.sequence_caps(ml.train)  # what `train --seq-max-len auto` (the default) sets
    return {
        # what the issue measured against: the first release, full-length transformer encoders
        "wave1 transformer (issue's 'today')": ModelConfig.from_preset("small", schema, seq_encoder="transformer",
                                                                       **HYFORMER_WAVE1, **hy),
        f"wave1 longer, caps {caps} (--hy-form wave1)": ModelConfig.from_preset("small", schema, seq_max_len=caps,
                                                                              **HYFORMER_WAVE1, **hy),
        f"paper small, caps {caps} (train's default)": ModelConfig.from_preset("small", schema, seq_max_len=caps,
                                                                               **hy),
        "paper small, --seq-max-len off": ModelConfig.from_preset("small", schema, **hy),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per config (after 2 warm-up steps)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", default=None, help="also print torch.profiler's top ops of this config")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ml = MovieLens()
    cfgs = contenders(ml)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(a.steps + 2):
        idx = rng.choice(len(ml.train), a.batch_size, replace=False)
        batches.append((to_torch(ml.batch(ml.train, idx)), torch.from_numpy(ml.train.labels[idx])))
    runs = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        model = build_model(cfg).train()
        if name.startswith("wave1 transformer"):
            model.fit_training_layout = False  # the first release laid every sequence out at the stream's width
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    loss_fn = nn.BCEWithLogitsLoss()

    def step(name, b, y):
        model, opt = runs[name]
        loss = loss_fn(model(b), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    times: dict[str, list[float]] = {n: [] for n in cfgs}
    for i, (b, y) in enumerate(batches):
        for name in (list(cfgs) if i % 2 == 0 else list(cfgs)[::-1]):  # interleaved, alternating order
            t0 = time.perf_counter()
            step(name, b, y)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    first = next(iter(med))
    out = {n: {"seconds_per_step": round(m, 4), "speedup_vs_first": round(med[first] / m, 3)} for n, m in med.items()}
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        for n, r in out.items():
            print(f"{n:40s} {r['seconds_per_step']:.4f} s/step  {r['speedup_vs_first']:.2f}x")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b, y in batches[:5]:
                step(a.profile, b, y)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
