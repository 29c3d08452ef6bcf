"""validate/module.py on examples/fused_qkv_cls.py exported once (cached on disk): the cases it
draws, the rows it reports, the tolerance (absolute, relative above 1) and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onetrans_trt.errors import BuildError, ValidationFailed
from onetrans_trt.protocol import SplitSpec, random_inputs
from onetrans_trt.validate import module as vm
from tests.mutation_kills.validate_fixture import example_module, module_build, tiny_random_build


@pytest.fixture(scope="module")
def ex():
    return example_module()


@pytest.fixture(scope="module")
def build():
    return module_build()


def test_read_spec(build, ex):
    spec = vm.read_spec(build)
    want = SplitSpec.parse(ex.SPEC)
    assert spec == want or (spec.history.max == want.history.max and [i.name for i in spec.inputs] ==
                            [i.name for i in want.inputs])
    ours = tiny_random_build() / "build"
    with pytest.raises(BuildError) as e:
        vm.read_spec(ours)
    assert str(e.value) == f"{ours}: not exported from a module (no protocol in the manifest)"


def test_cases_cover_the_edges_then_draw_at_random(ex):
    spec = SplitSpec.parse(ex.SPEC)
    hmax = spec.history.max
    got = vm.cases(spec, 11, seed=3, max_candidates=40)
    assert len(got) == 11
    names = [n for n, _, _ in got]
    lengths = [int(u["hist_len"][0]) for _, u, _ in got]
    counts = [int(next(iter(c.values())).shape[0]) for _, _, c in got]
    assert lengths[:8] == [0, 1, hmax, hmax + 7] * 2
    assert counts[:3] == [1, 2, 40]
    assert all(1 <= c <= 40 for c in counts) and all(0 <= n < hmax + 8 for n in lengths[8:])
    assert names == [f"history {n}, {c} candidates" for n, c in zip(lengths, counts)]
    for _, u, c in got:
        assert all(v.shape[0] == 1 for v in u.values())  # one user per case
        assert set(u) | set(c) == {i.name for i in spec.inputs}
    again = vm.cases(spec, 11, seed=3, max_candidates=40)
    assert all(torch.equal(a[1][k], b[1][k]) for a, b in zip(got, again) for k in a[1])
    other = vm.cases(spec, 11, seed=4, max_candidates=40)
    assert [n for n, _, _ in other] != names
    default = vm.cases(spec, 3)
    assert [int(next(iter(c.values())).shape[0]) for _, _, c in default] == [1, 2, 300]
    assert vm.cases(spec, 0) == []


def test_validate_module_build_rows(build, ex):
    msgs = []
    rep = vm.validate_module_build(build, ex.factory(), count=10, seed=1, progress=msgs.append)
    assert rep["ok"] is True and rep["tolerance"] == vm.ATOL == 1e-4
    assert rep["build"] == str(build) and rep["data"] == "random from the spec (10 cases)"
    assert rep["cases"] == 10 == len(rep["rows"])
    spec = SplitSpec.parse(ex.SPEC)
    want = vm.cases(spec, 10, seed=1)
    assert [r["case"] for r in rep["rows"]] == [n for n, _, _ in want]
    assert [r["candidates"] for r in rep["rows"]] == [int(next(iter(c.values())).shape[0]) for _, _, c in want]
    assert all(r["user"] == 0 for r in rep["rows"])
    assert rep["max_abs"] == max(r["max_abs"] for r in rep["rows"]) and 0 < rep["max_abs"] <= 1e-4
    assert len(msgs) == 1 and msgs[0] == f"10/10 cases, worst {rep['max_abs']:.2e}"
    assert vm.validate_module_build(build, ex.factory(), count=3)["cases"] == 3


def _inputs(ex, users=2, c=5, seed=0):
    spec = SplitSpec.parse(ex.SPEC)
    return random_inputs(spec, users=users, candidates=c, lengths=[3, 0][:users], rng=np.random.default_rng(seed))


def test_given_inputs_are_scored_per_user(build, ex):
    rep = vm.validate_module_build(build, ex.factory(), inputs=_inputs(ex))
    assert rep["data"] == "given inputs" and rep["cases"] == 2
    assert [(r["case"], r["user"], r["candidates"]) for r in rep["rows"]] == [("given inputs", 0, 5),
                                                                              ("given inputs", 1, 5)]


class Shifted(torch.nn.Module):
    """The example's unified forward plus a shift (of ``rel`` times max(1, |score|)), or times ``scale``."""

    def __init__(self, inner, shift=0.0, scale=1.0, relative=True):
        super().__init__()
        self.inner, self.shift, self.scale, self.relative = inner, shift, scale, relative

    def forward(self, x):
        y = self.inner(x) * self.scale
        base = torch.clamp(y.abs().max(), min=1.0) if self.relative else 1.0
        return y + self.shift * base


def test_a_module_that_differs_fails_naming_the_case(build, ex):
    with pytest.raises(ValidationFailed) as e:
        vm.validate_module_build(build, Shifted(ex.factory(), shift=3e-4), count=2)
    msg = str(e.value)
    assert msg.startswith(f"{build}: ORT split differs from the module's unified forward by ")
    assert msg.endswith(" on history 0, 1 candidates (user 0); tolerance 0.0001")
    with pytest.raises(ValidationFailed) as e:
        vm.validate_module_build(build, Shifted(ex.factory(), shift=3e-4), inputs=_inputs(ex, users=2))
    assert "on given inputs (user 0)" in str(e.value)


def test_the_tolerance_bar(build, ex):
    # the example's scores stay below 1 in size, so the bar is 1e-4 absolute: a shift of half of it
    # passes, one of 1.6x fails
    rep = vm.validate_module_build(build, Shifted(ex.factory(), shift=0.5e-4, relative=False), count=3)
    assert rep["ok"] and 0.4e-4 < rep["max_abs"] < 0.6e-4
    with pytest.raises(ValidationFailed):
        vm.validate_module_build(build, Shifted(ex.factory(), shift=1.6e-4, relative=False), count=3)


def test_the_module_is_put_in_float32_eval_mode(build, ex):
    m = ex.factory().double().train()
    rep = vm.validate_module_build(build, m, count=2)
    assert rep["ok"] and not m.training and next(m.parameters()).dtype == torch.float32
