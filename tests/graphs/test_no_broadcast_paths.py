"""no-broadcast finds a per-candidate copy of K/V however the naive scorer reaches it.

Each naive scorer below is a small PyTorch module exported the way our scorer graphs are
(dynamo exporter, opset 23, K/V inputs named ``user_k_<l>``/``user_v_<l>`` with a
``kv_len_<l>`` dimension, candidate inputs with a ``candidates`` dimension); each
copies the user's K once per candidate along a different route, then attends to it.
"""

import numpy as np
import pytest
import torch
from torch.export import Dim

from onetrans_trt.errors import BuildError
from onetrans_trt.graphs import run_passes
from onetrans_trt.graphs.no_broadcast import kv_broadcasts, no_broadcast
from tests.helpers import ort_run

H, L, DH, C = 2, 5, 4, 3


class NaiveScorer(torch.nn.Module):
    """Candidates' queries attend to a copy of the user's K per candidate."""

    def __init__(self, route: str):
        super().__init__()
        self.route = route
        self.q = torch.nn.Linear(DH, H * DH)

    def forward(self, ns_x, user_k_0, user_v_0):
        c = ns_x.shape[0]
        q = self.q(ns_x).reshape(c, H, 1, DH)
        k = user_k_0
        if self.route == "mul_expand":  # scaled K, then expanded
            kb = (k * 0.5).expand(c, -1, -1, -1)
        elif self.route == "tile":
            kb = k.repeat(c, 1, 1, 1)
        elif self.route == "transpose_expand":  # K^T expanded, transposed back
            kb = k.transpose(2, 3).expand(c, -1, -1, -1).transpose(2, 3)
        elif self.route == "reshape_tile":
            kb = k.reshape(1, H, -1).repeat(c, 1, 1).reshape(c, H, -1, DH)
        elif self.route == "cast_expand":  # via float64 and back
            kb = k.double().expand(c, -1, -1, -1).float()
        elif self.route == "implicit_mul":  # an elementwise op broadcasts by itself
            kb = k * torch.sigmoid(ns_x[:, :1]).reshape(c, 1, 1, 1)
        elif self.route == "gather":  # one index per candidate
            kb = k.index_select(0, (ns_x[:, 0] * 0).long())
        elif self.route == "heads_expand":  # grouped heads: [1, 1, L, dh] -> [1, H, L, dh], not per candidate
            kb = k.expand(1, H, -1, -1)
        else:
            raise ValueError(self.route)
        att = torch.softmax(q @ kb.transpose(-1, -2) / DH ** 0.5, -1)
        v = user_v_0.expand(1, H, -1, -1) if self.route == "heads_expand" else user_v_0
        return (att @ v).sum((1, 2, 3))


def _export(route: str):
    import onnx_graphsurgeon as gs

    torch.manual_seed(0)
    kv_heads = 1 if route == "heads_expand" else H
    args = (torch.randn(C, DH), torch.randn(1, kv_heads, L, DH), torch.randn(1, kv_heads, L, DH))
    kv_len, cands = Dim("kv_len_0", min=1, max=4096), Dim("candidates", min=1, max=4096)
    module = NaiveScorer(route).eval()
    prog = torch.onnx.export(module, args, dynamo=True, opset_version=23,
                             input_names=["ns_x", "user_k_0", "user_v_0"], output_names=["logits"],
                             dynamic_shapes={"ns_x": {0: cands}, "user_k_0": {2: kv_len}, "user_v_0": {2: kv_len}},
                             external_data=False, verbose=False)
    model = prog.model_proto
    # the exported graph is the naive scorer: it computes what the module does
    feeds = {"ns_x": args[0].numpy(), "user_k_0": args[1].numpy(), "user_v_0": args[2].numpy()}
    with torch.no_grad():
        want = module(*args).numpy()
    np.testing.assert_allclose(ort_run(model, feeds)[0], want, rtol=1e-5, atol=1e-6)
    return gs.import_onnx(model)


# route -> the ops the K must go through, in order, the last one the copy
ROUTES = {
    "mul_expand": ["Mul", "Expand"],
    "tile": ["Tile"],
    "transpose_expand": ["Transpose", "Expand"],
    "reshape_tile": ["Reshape", "Tile"],
    "cast_expand": ["Cast", "Expand"],
    "implicit_mul": ["Mul"],
    "gather": ["Gather"],
}


def _is_subsequence(want: list[str], ops: list[str]) -> bool:
    it = iter(ops)
    return all(op in it for op in want)


@pytest.mark.parametrize("route", list(ROUTES))
def test_each_route_to_a_per_candidate_copy_is_caught(route):
    g = _export(route)
    hits = kv_broadcasts(g)
    assert [h.source for h in hits] == ["user_k_0"], [str(h) for h in hits]
    (hit,) = hits
    ops = [n.op for n in hit.path]
    assert ops[-1] == ROUTES[route][-1] and hit.node is hit.path[-1]
    assert _is_subsequence(ROUTES[route], ops), ops
    # the path is connected: each node reads what the previous one wrote
    assert any(t.name == "user_k_0" for t in hit.path[0].inputs)
    for i in range(1, len(hit.path)):
        assert set(map(id, hit.path[i - 1].outputs)) & set(map(id, hit.path[i].inputs)), ops
    assert any("candidates" in str(d) for o in hit.node.outputs for d in o.shape)
    with pytest.raises(BuildError, match=r"copies the user's K/V per candidate .*user_k_0 -> "):
        no_broadcast(g)
    with pytest.raises(BuildError, match="no-broadcast"):
        run_passes(g, ["no-broadcast"], graph_name="candidate_scorer")


def test_a_broadcast_over_heads_is_not_a_copy_per_candidate():
    """[1, 1, L, dh] -> [1, H, L, dh]: the copy does not grow with the candidates."""
    g = _export("heads_expand")
    expands = [n for n in g.nodes if n.op == "Expand" and any(t.name.startswith("user_") for t in n.inputs)]
    assert len(expands) == 2  # the pass walks past them...
    assert kv_broadcasts(g) == []  # ...and finds nothing per candidate
    assert no_broadcast(g) is g


def test_a_broadcast_with_unknown_shape_is_reported():
    """Without a shape, an Expand/Tile of K/V may be per candidate: the pass says so."""
    g = _export("tile")
    (tile,) = [n for n in g.nodes if n.op == "Tile"]
    tile.outputs[0].shape = None
    assert [h.node for h in kv_broadcasts(g)] == [tile]
