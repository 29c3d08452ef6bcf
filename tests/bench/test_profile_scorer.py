"""tools/profile_scorer.py counts each profiled product's FLOPs from ONNX Runtime's shapes: a
MatMul, a FusedMatMul whose second operand is transposed (attention's q.k^T), one with a
1-D operand, and a Gemm with its weight transposed."""

from __future__ import annotations

from tools.profile_scorer import matmul_flops


def _args(op: str, a: list[int], b: list[int], out: list[int]) -> dict:
    return {"op_name": op, "input_type_shape": [{"float": a}, {"float": b}], "output_type_shape": [{"float": out}]}


def test_matmul_flops_reads_k_from_the_right_axis():
    assert matmul_flops(_args("MatMul", [16, 1024, 256], [16, 256, 1024], [16, 1024, 1024])) == 2 * 16 * 1024 * 1024 * 256
    # q [1, 4, 8192, 64] times k [1, 4, 512, 64] transposed: K = 64, not 512
    assert matmul_flops(_args("FusedMatMul", [1, 4, 8192, 64], [1, 4, 512, 64], [1, 4, 8192, 512])) == \
        2 * 4 * 8192 * 512 * 64
    # the candidates' axis transposed into the batch (transBatchA): A [C, T, d], output [T, C, d']
    assert matmul_flops(_args("FusedMatMul", [1024, 16, 256], [16, 256, 512], [16, 1024, 512])) == \
        2 * 16 * 1024 * 512 * 256
    assert matmul_flops(_args("MatMul", [32, 256], [256], [32])) == 2 * 32 * 256
    # Gemm [C, 512] x W^T with W [4096, 512]: K = 512
    assert matmul_flops(_args("Gemm", [1024, 512], [4096, 512], [1024, 4096])) == 2 * 1024 * 4096 * 512


def test_profile_kinds():
    from tools.profile_scorer import kind_of

    assert kind_of("aten::bmm") == kind_of("aten::addmm") == "matmul"
    assert kind_of("graph_0_cpp_fused_add_gelu_unsqueeze_9") == "fused"
    assert kind_of("aten::copy_") == kind_of("## Call CompiledFxGraph abc ##") == "other"


def test_the_pytorch_side_profile_counts_the_scorers_products(tiny_build):
    """The eager scorer of the build's checkpoint under torch.profiler: its products' FLOPs are
    the scorer graph's (graphs/flops counts them from the ONNX graph, independently)."""
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.export.inspect import request_dims
    from onetrans_trt.graphs.flops import graph_flops
    from tools.profile_scorer import profile_torch

    c, hist = 5, 6
    res = profile_torch(tiny_build, "torch-split", c, hist, threads=1, runs=2)
    assert res["wall_ms"] > 0 and res["flops"] and set(res["flops"]) <= {"aten::bmm", "aten::addmm", "aten::mm"}
    dims = request_dims(read_manifest(tiny_build), c, hist)
    want = graph_flops(tiny_build / "candidate_scorer.onnx", dims)["flops"]
    got = sum(res["flops"].values())
    assert abs(got - want) <= 0.02 * want, (got, want)
