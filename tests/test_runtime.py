"""kernels.runtime.Op: eager calls on plain tensors run the op's function directly (with its
registered autograd formula); traced or intercepted calls go through the registered op. Both ways
must give the same numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from gpt.model import GPT, GPTConfig, model_ops
from tests.devices import skip_unless_triton_runs
from tests.memory import OpCount


def _leaves(*shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _norm(x, w, b, r):
    return sum(y.square().sum() for y in kernels.get("layer_norm", "triton")(x, w, b, 1e-5, residual=r,
                                                                            dropout_p=0.3))


def _attention(q, k, v, angles=None):
    rope = None if angles is None else (angles.detach().cos(), angles.detach().sin())
    return kernels.get("attention", "triton")(q, k, v, causal=True, dropout_p=0.2, rope=rope).square().sum()


def _swiglu(g, u):
    return kernels.get("swiglu", "triton")(g, u).square().sum()


def _rope(x, angles):
    angles = angles.detach()  # constant tables, as the model's
    return kernels.get("rope", "triton")(x, angles.cos(), angles.sin()).square().sum()


def _cross_entropy(logits):
    return kernels.get("cross_entropy", "triton")(logits, torch.arange(5) % 7)


CASES = {
    "layer_norm": (_norm, [(3, 40), (40,), (40,), (3, 40)]),
    "attention": (_attention, [(1, 2, 19, 32), (1, 1, 19, 32), (1, 1, 19, 32)]),
    "attention with rope": (_attention, [(1, 2, 19, 32), (1, 1, 19, 32), (1, 1, 19, 32), (19, 16)]),
    "swiglu": (_swiglu, [(3, 40), (3, 40)]),
    "rope": (_rope, [(1, 2, 9, 16), (9, 8)]),
    "cross_entropy": (_cross_entropy, [(5, 7)]),
}


@pytest.mark.parametrize("op", CASES)
def test_direct_and_registered_calls_agree(op):
    """The loss and every gradient, bit for bit, dropout included (its seed drawn alike)."""
    skip_unless_triton_runs("triton", "cpu")
    fn, shapes = CASES[op]
    results = []
    for mode in (None, OpCount()):
        leaves = _leaves(*shapes)
        torch.manual_seed(1)
        if mode is None:
            loss = fn(*leaves)
        else:
            with mode:
                loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for direct, registered in zip(*results):  # (rope's tables get no gradient: None both ways)
        assert (direct is None and registered is None) or torch.equal(direct, registered), op


@pytest.mark.parametrize("op", CASES)
def test_second_order_gradients_are_refused_not_dropped(op):
    """create_graph=True through an op whose backward is kernels (no graph of its own): an error
    naming it, not gradients silently short of its part. Rope's backward is rope again: its
    second-order gradient is torch's."""
    skip_unless_triton_runs("triton", "cpu")
    fn, shapes = CASES[op]
    leaves = _leaves(*shapes)
    torch.manual_seed(1)
    if op != "rope":
        with pytest.raises(RuntimeError, match="tritongpt::.*second-order gradient"):
            torch.autograd.grad(fn(*leaves), leaves[0], create_graph=True)
        return
    (dx,) = torch.autograd.grad(fn(*leaves), leaves[0], create_graph=True)
    (ddx,) = torch.autograd.grad(dx.square().sum(), leaves[0])
    x, angles = (t.detach().requires_grad_() for t in leaves)
    (dx_ref,) = torch.autograd.grad(kernels.get("rope", "torch")(x, angles.cos(), angles.sin()).square().sum(), x,
                                    create_graph=True)
    (ddx_ref,) = torch.autograd.grad(dx_ref.square().sum(), x)
    torch.testing.assert_close(ddx, ddx_ref)


def _profiled_op_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("tritongpt::")}


def test_eager_calls_skip_the_op_dispatch():
    """On plain tensors neither the forward nor the backward passes through the registered op;
    under a dispatch mode both do."""
    skip_unless_triton_runs("triton", "cpu")
    x, w, b, r = _leaves((3, 40), (40,), (40,), (3, 40))
    w, b = torch.nn.Parameter(w), torch.nn.Parameter(b)  # as a model's norm passes them
    assert _profiled_op_names(lambda: _norm(x, w, b, r).backward()) == set()

    def intercepted():
        with OpCount():
            _norm(x, w, b, r).backward()
    assert _profiled_op_names(intercepted) == {"tritongpt::norm_fwd", "tritongpt::norm_bwd"}


def test_an_eager_training_step_skips_every_op_dispatch():
    """The model's own calls (parameters, views of one projection, recomputed blocks) take the
    direct way too."""
    skip_unless_triton_runs("triton", "cpu")
    config = GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=16, vocab_size=50, norm="rmsnorm",
                       pos_encoding="rope", mlp="swiglu", dropout=0.1)
    model = GPT(config, {op: "triton" for op in model_ops(config)})
    model.recompute_blocks(True)
    idx = torch.randint(0, 50, (2, 16))
    assert _profiled_op_names(lambda: model(idx, idx)[1].backward()) == set()


OP_KERNELS = {
    "attention_fwd": ["_attn_fwd"], "attention_rope_fwd": ["_attn_fwd", "_rope_kernel"],
    "attention_bwd": ["_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq", "_rope_kernel"],
    "cross_entropy_fwd": ["_cross_entropy_fwd_kernel"], "cross_entropy_bwd": ["_cross_entropy_bwd_kernel"],
    "norm_fwd": ["_norm_fwd_kernel"], "norm_bwd": ["_norm_bwd_kernel", "_norm_sum_partials_kernel"],
    "rope": ["_rope_kernel"],
    "swiglu": ["_swiglu_fwd_kernel"], "swiglu_backward": ["_swiglu_bwd_kernel"],
}


def last_json_line_as_on_a_gpu(*args: str):
    """The last line a `python *args` subprocess prints, as JSON, its kernels compiled JIT
    functions as on a GPU (not the interpreter's)."""
    out = subprocess.run([sys.executable, *args], env={**os.environ, "TRITON_INTERPRET": "0"},
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    return json.loads(out.stdout.splitlines()[-1])


def test_triton_op_finds_every_ops_kernels():
    """torch.library.triton_op lists the kernels an op launches (read off its source: launches
    written `wrap_triton(_kernel)`), and torch's compile caches key on their sources: an op whose
    list missed a kernel could be served compiled code of an older version of it. Checked as on a
    GPU (kernels registered through triton_op, not the interpreter's custom ops), in a subprocess."""
    code = ("import json, torch._library.triton as t, kernels\n"
            "table = getattr(t, 'triton_ops_to_kernels', None)\n"
            "print(json.dumps(None if table is None else {name.removeprefix('tritongpt::'): "
            "sorted(getattr(k, 'fn', k).__name__ for k in ks) for name, ks in table.items() "
            "if name.startswith('tritongpt::')}))")
    found = last_json_line_as_on_a_gpu("-c", code)
    if found is None:
        pytest.skip(f"torch {torch.__version__} keeps no list of triton_op kernels")
    assert found == OP_KERNELS


def test_inductor_rebuilds_every_kernel_whole():
    """torch.compile's Inductor compiles each kernel from its source and the JIT functions and
    constants it finds it uses, under their bare names: a kernel that read a helper through its
    module (`runtime.tile`) failed to compile on the GPU, under torch.compile only
    (tests/inductor_source.py)."""
    report = last_json_line_as_on_a_gpu("-m", "tests.inductor_source")
    if report is None:
        pytest.skip(f"torch {torch.__version__} has no Inductor rebuilding of Triton kernels to check against")
    assert len(report) >= 30  # every JIT function of kernels/, each checked as a kernel
    assert {name: problems for name, problems in report.items() if problems} == {}
