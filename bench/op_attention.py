"""Attention benchmark: forward and backward TFLOPS of each backend, causal, bf16.

    python -m bench.op_attention [--json attention.json]

Shapes keep B*T = 16k tokens and H*D = 2048 (a GPT layer's width) for T from 512 to 16k and head
dims 64 and 128; q, k and v are views of one qkv projection, as in the model. Last, T = 1024 and
D = 64 with dropout 0.2 on the attention weights (nanoGPT's shakespeare-char config drops them):
what the mask's random numbers cost each backend. Backends: `torch` =
torch SDPA (its flash or cuDNN backend, whichever torch picks), `compile` = torch.compile of it,
`triton` = the registry's triton backend.

FLOPs credited, the useful work (bench/cases.py): forward 4*B*H*T^2*D (two matmuls), halved
when causal; backward 2.5x the forward (five matmuls to the forward's two). fwd+bwd times the
forward plus torch.autograd.grad of q, k and v. `bwd` is the fwd+bwd median less the fwd median
(bench.backends.add_backward). The roofline is the bf16 matmul rate measured in the same
run. `verified`: the output and dq, dk, dv as accurate as SDPA's, by the project's rule
(kernels/accuracy.py), at that T and D for one sequence and one head: the float64 reference
stores every head's T x T scores, more than a GPU holds at 16k tokens. With dropout, against
attention's formula given the backend's own mask (bench/cases.py).
"""
import dataclasses
import sys
from collections.abc import Iterator

from bench import backends
from bench.cases import Case, Shapes, case
from bench.measure import Row
from gpt.model import GPTConfig

TOKENS = 16 * 1024
WIDTH = 2048  # H * D
SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
def _shapes(T: int, D: int, dropout: float = 0.0) -> Shapes:
    return Shapes(GPTConfig(n_embd=WIDTH, n_head=WIDTH // D, block_size=T, dropout=dropout), batch_size=TOKENS // T)


SHAPES = (*(_shapes(T, D) for D in HEAD_DIMS for T in SEQ_LENS), _shapes(1024, 64, dropout=0.2))


def _checked(s: Shapes, device) -> Case:
    """The case the check runs: one sequence and one head of `s`."""
    config = dataclasses.replace(s.config, n_embd=s.config.head_dim, n_head=1, n_kv_head=1)
    return case("attention", Shapes(config, batch_size=1, seq_len=s.T, dtype=s.dtype), device)


def run(device: str = "cuda", shapes: tuple[Shapes, ...] = SHAPES) -> Iterator[Row]:
    impls = backends.implementations("attention")
    for s in shapes:
        yield from backends.measure(case("attention", s, device), impls, device, checked=_checked(s, device))


def launch_configs(device: str | None = None) -> str:
    """The triton backend's launch configuration of each pass at each head dim on `device` (this
    machine's GPU by default, else the interpreter's), as kernels/attention.py's tables give them:
    which kernel variant the rows timed."""
    import torch

    from kernels import attention

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    def configs(D: int, T: int) -> str:
        q = torch.empty(1, 1, T, D, device=device, dtype=torch.bfloat16)
        return " ".join(f"{w} {tuple(attention._config(q, w))}" for w in ("fwd", "dkdv", "dq"))

    parts = []
    for D in HEAD_DIMS:
        short, long = configs(D, attention.SHORT_T), configs(D, attention.SHORT_T + 1)
        parts += ([f"D={D} {long}"] if short == long else
                  [f"D={D} T<={attention.SHORT_T} {short}", f"D={D} T>{attention.SHORT_T} {long}"])
    return "triton (block_m, block_n, warps, stages, tma): " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    status = backends.cli(__doc__, run, f"attention, causal bf16, B*T = {TOKENS} tokens, H*D = {WIDTH}", argv)
    if status == 0:
        print(launch_configs())
    return status


if __name__ == "__main__":
    sys.exit(main())
