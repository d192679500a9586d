"""Every Triton kernel compiles for the GPUs the project targets, with the launch configurations
they would get, and fits them: tests/sm_compile.py in a process of its own (kernels there are
compiled JIT functions, not the interpreter's), started in the background at collection
(tests/background.py). On a GPU machine the suite compiles them for real."""
import re
import sys

import pytest
import torch

from tests import background


cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU's own tests compile every kernel natively")


def command(arch: int) -> tuple[str, ...]:
    return (sys.executable, "-m", "tests.sm_compile", "--arch", str(arch))


@cpu_only
@pytest.mark.parametrize("arch", [pytest.param(arch, id=f"sm{sm}", marks=pytest.mark.background(command(arch)))
                                  for arch, sm in ((8, 80), (9, 90), (10, 100), (12, 120))])
def test_every_kernel_compiles_and_fits(arch):
    run = background.result(command(arch))
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    assert "launches compiled" in run.stdout


# check() of a stand-in kernel taking 120 KB of shared memory, at sm80 (in a process of its own:
# importing tests.sm_compile switches the interpreter off).
LEAST_SHARED = (sys.executable, "-c",
                "import types, tests.sm_compile as s; s.resources = lambda kernel: dict(reg=32, local=0, stack=0); "
                "meta = types.SimpleNamespace(num_warps=4, num_stages=4, shared=120 * 1024); "
                "print(s.check(types.SimpleNamespace(metadata=meta, asm=dict(ptx='')), '_attn_fwd', None, 8)[1])")


@pytest.mark.background(LEAST_SHARED)
def test_sm80s_tables_fit_the_cards_with_the_least_shared_memory():
    """The sm80 tables serve sm86 and sm89 (99 KB of shared memory a block) as well as the A100
    (163 KB): a kernel taking 120 KB fails the check."""
    run = background.result(LEAST_SHARED)
    assert run.returncode == 0, run.stderr[-6000:]
    assert "_attn_fwd takes 122880 bytes of shared memory, more than a block gets on some card taking sm_80's " \
           "tables (the least: 101376)" in run.stdout, run.stdout


SUITE = (sys.executable, "-m", "tests.sm_compile", "--arch", "9", "--suite", "tests/test_swiglu.py")


@cpu_only
@pytest.mark.background(SUITE)
def test_the_suites_launches_compile():
    """--suite runs tests with their launches compiled (swiglu's here, its CPU cases included: the
    stand-in lets the triton backends take CPU tensors), and says how many kernels."""
    run = background.result(SUITE)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    launches, kernels = map(int, re.search(r"the suite's (\d+) launches compiled (\d+) kernels", run.stdout).groups())
    assert launches > kernels >= 2, run.stdout[-2000:]
