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
