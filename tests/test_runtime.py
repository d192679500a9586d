"""kernels.runtime.Op: eager calls on plain tensors run the op's function directly (with its
registered autograd formula); traced or intercepted calls go through the registered op. Both ways
must give the same numbers."""
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
