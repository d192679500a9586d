"""torch.compile's Inductor runs the triton ops' kernels on the buffers they write, copying none,
and compiles generation's changing shapes: tests/inductor_graph.py in a process of its own (there
the kernels are compiled JIT functions, as on a GPU, not the interpreter's). On a GPU machine the
graphs are that GPU's. The process starts in the background at collection (tests/background.py)."""
import sys

import pytest

from tests import background

COMMAND = (sys.executable, "-m", "tests.inductor_graph")


# tests.inductor_graph.CONFIGS (not imported here: importing it switches the interpreter off)
CONFIGS = ("gpt2", "llama-gqa", "gpt2 dropout recompute", "llama dropout recompute", "llama-gqa TMA")


@pytest.mark.background(COMMAND)
def test_compiled_training_steps_copy_no_buffer():
    """Every configuration's forward and backward (the TMA one too: the stand-in is an sm_90), each
    with its copies counted and none found, and generation."""
    run = background.result(COMMAND)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    lines = run.stdout.splitlines()
    for name in CONFIGS:
        for which in ("forward", "backward"):
            line = next((line for line in lines if line.startswith(f"{name} {which}: ")), None)
            assert line is not None and line.endswith("; copies: none"), (name, which, run.stdout[-3000:])
    assert f"{len(CONFIGS)} training steps compiled by Inductor" in run.stdout
    tma = [line for line in lines if line.startswith("llama-gqa TMA forward: ")]
    assert "_attn_fwd TMA" in tma[0], tma
    assert "generation compiled" in run.stdout


# problems_of() and _node() on stand-in graphs, in a process of their own too.


_PROBE_CODE = r'''
import json, types
import tests.inductor_graph as g
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from kernels import attention

L = ("triton_kernel_wrapper_mutation", "_norm_fwd_kernel")
T = ("triton_kernel_wrapper_mutation", "_attn_fwd TMA")
MM = ("aten.mm.default", None)
steps = {
    "clean": ([[L, MM], [L, MM]], False), "clean tma": ([[T, MM], [T, L]], True),
    "clone": ([[L, MM, ("aten.clone.default", None)], [L]], False),
    "copy_": ([[L], [L, ("aten.copy_.default", None)]], False),
    "slice_scatter": ([[L, ("aten.slice_scatter.default", None)], [L]], False),
    "cat": ([[L], [L, ("aten.cat.default", None)]], False),
    "functional": ([[L, ("triton_kernel_wrapper_functional", "_norm_fwd_kernel")], [L]], False),
    "no launches": ([[L], [MM]], False), "one graph": ([[L]], False), "three graphs": ([[L], [L], [L]], False),
    "no tma": ([[L], [T]], True),
}
out = {name: g.problems_of(name, step, tma) for name, (step, tma) in steps.items()}

def node(**constants):
    kernel_idx = kernel_side_table.add_kernel(attention._attn_fwd)
    args_idx = kernel_side_table.add_constant_args(constants)
    return types.SimpleNamespace(target="triton_kernel_wrapper_mutation",
                                 kwargs=dict(kernel_idx=kernel_idx, constant_args_idx=args_idx, kwargs={}))
out["node"] = [g._node(node(TMA=True)), g._node(node(TMA=False)), g._node(node()),
               g._node(types.SimpleNamespace(target="aten.mm.default", kwargs={}))]
print(json.dumps(out))
'''
PROBE = (sys.executable, "-c", _PROBE_CODE)


def probe() -> dict:
    return background.last_json(PROBE)


@pytest.mark.background(PROBE)
def test_clean_steps_pass():
    assert probe()["clean"] == [] and probe()["clean tma"] == []


@pytest.mark.background(PROBE)
@pytest.mark.parametrize("copy", ["clone", "copy_", "slice_scatter", "cat"])
def test_a_copy_of_any_kind_fails(copy):
    problems = probe()[copy]
    assert len(problems) == 1 and "Inductor copies buffers" in problems[0], problems


@pytest.mark.background(PROBE)
def test_a_launch_left_functional_or_a_graph_without_launches_fails():
    assert probe()["functional"] == ["functional forward: 1 launches left functional, 1 kernels"]
    assert probe()["no launches"] == ["no launches backward: 0 launches left functional, 0 kernels"]


@pytest.mark.background(PROBE)
def test_a_step_of_other_than_two_graphs_fails():
    assert probe()["one graph"] == ["one graph: 1 graphs compiled, not a forward and a backward"]
    assert probe()["three graphs"] == ["three graphs: 3 graphs compiled, not a forward and a backward"]


@pytest.mark.background(PROBE)
def test_tma_asked_for_and_not_launched_fails():
    assert probe()["no tma"] == ["no tma forward: no launch loads through TMA"]


@pytest.mark.background(PROBE)
def test_a_launch_is_marked_tma_only_where_its_tma_constexpr_is_set():
    assert probe()["node"] == [["triton_kernel_wrapper_mutation", "_attn_fwd TMA"],
                               ["triton_kernel_wrapper_mutation", "_attn_fwd"],
                               ["triton_kernel_wrapper_mutation", "_attn_fwd"], ["aten.mm.default", None]]
