"""The kernel profile's cases under pytest-benchmark (GPU only; not collected by a plain `pytest`):

    pytest tests/bench_kernels.py [--benchmark-json out.json]

Each case is one op, pass and backend at GPT-2 124M's training shapes (B=16, T=1024, bf16), the
shapes `python -m bench.kernels` profiles by default. pytest-benchmark times with the host clock,
so each round synchronizes the GPU: bench.kernels' CUDA-event medians are the figures to quote.
tests/test_bench_smoke.py runs every case on CPU, at tiny shapes, so that it cannot rot unseen.
"""
import pytest
import torch

import kernels
from bench.backends import implementations
from bench.cases import Shapes, case
from gpt.model import GPTConfig, preset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")

SHAPES = Shapes(GPTConfig(**preset("gpt2")), batch_size=16)
PASSES = {op: case(op, SHAPES, "meta").passes for op in kernels.OPS}
CASES = [(op, pass_, backend) for op in kernels.OPS for pass_ in PASSES[op]
         for backend in ("torch", "compile", "triton")]


@pytest.mark.parametrize("op, pass_, backend", CASES, ids=["-".join(c) for c in CASES])
def test_kernel(benchmark, op, pass_, backend):
    run_case(benchmark, op, pass_, backend)


def run_case(benchmark, op: str, pass_: str, backend: str, shapes: Shapes = SHAPES, device: str = "cuda"):
    impls = implementations(op)
    if backend not in impls:
        pytest.skip(f"{op} has no {backend} variant")
    c = case(op, shapes, device)
    fn, inputs = impls[backend], c.make()

    def run():
        c.call(fn, inputs, pass_)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    run()  # compile and autotune outside the rounds
    benchmark.extra_info["unit"] = c.unit
    benchmark(run)
