"""kernels.split: the views of a projection's output, whose gradients join without a copy where
the Triton backwards write them side by side (attention's d_qkv, SwiGLU's d_h)."""
import pytest
import torch

import kernels
from gpt.model import GPT, GPTConfig, model_ops
from kernels.packed import join
from tests.devices import compiled, skip_unless_triton_runs
from tests.memory import OpCount


def shares_memory(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_adjacent_slices_join_as_a_view(dim):
    buf = torch.randn(3, 5, 12)
    parts = buf.split({3: [1, 2], 5: [2, 1, 2], 12: [4, 3, 5]}[buf.shape[dim]], dim)
    joined = join(list(parts), dim)
    assert torch.equal(joined, buf) and shares_memory(joined, buf)


def test_slices_of_two_tensors_join_as_a_copy_though_their_offsets_chain():
    """a's first three columns and b's next three: as a view of a they would be a's six."""
    a, b = torch.randn(4, 12), torch.randn(4, 12)
    assert torch.equal(join([a[:, :3], b[:, 3:6]], 1), torch.cat([a[:, :3], b[:, 3:6]], 1))


def test_views_of_views_join_as_a_view():
    """The parts as attention's backward leaves them: (B, H, T, D) head views of one (B, T, heads,
    D) buffer, brought back to (B, T, H*D) by the model's view and transpose."""
    buf = torch.randn(2, 7, 4 + 2 * 2, 16)
    parts = [t.transpose(1, 2).transpose(1, 2).reshape(2, 7, -1) for t in buf.split([4, 2, 2], dim=2)]
    joined = join(parts, 2)
    assert torch.equal(joined, buf.view(2, 7, -1)) and shares_memory(joined, buf)


def test_other_parts_are_concatenated():
    buf = torch.randn(4, 6)
    cases = {
        "separate tensors": [torch.randn(4, 2), torch.randn(4, 3)],
        "out of order": [buf[:, 3:], buf[:, :3]],
        "a gap": [buf[:, :2], buf[:, 3:]],
        "other strides": [buf[:, :2], buf[:, 2:4].contiguous()],
        # adjacent along dim 1 by offset, yet row 0's second half is row 1's first half: a view
        # would alias elements
        "overlapping": [buf.view(-1)[:12].view(4, 3)[:2], buf.view(-1)[3:15].view(4, 3)[:2]],
        # offsets that chain, in another row stride
        "another layout": [buf[:, :2], buf.view(-1)[2:14].view(4, 3)],
        "no base": [torch.empty_strided((4, 0), (3, 1)), torch.randn(4, 3)],
    }
    for what, parts in cases.items():
        joined = join(parts, 1)
        assert torch.equal(joined, torch.cat(parts, 1)), what
        assert not any(shares_memory(joined, p) for p in parts), what


def test_split_gradients_match_torch_split():
    """Through autograd, any gradients the parts get (one part unused: zeros) add up as for
    Tensor.split."""
    x = torch.randn(3, 10, requires_grad=True)
    # one size: parts of 4, 4 and 2, as Tensor.split takes it
    cases = [([4, 2, 4], [torch.randn(3, 4), torch.randn(3, 2)]), (4, [torch.randn(3, 4), torch.randn(3, 4)])]
    grads = []
    for split in (kernels.split, torch.Tensor.split):
        for sizes, ws in cases:
            x.grad = None
            parts = split(x, sizes, -1)
            sum((p * w).sum() for p, w in zip(parts, ws)).backward()
            grads.append(x.grad)
    assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[3])


def backward_ops(fn, x):
    """The aten ops the backward of fn(x * 2).sum() runs, and x's gradient: the split's input is
    not the leaf, as in the model (the projection's output; a leaf's gradient is concatenated,
    test_a_leafs_gradient_owns_its_memory)."""
    x = x.detach().requires_grad_()
    y = fn(x * 2)
    with OpCount() as count:
        y.backward(torch.randn_like(y))
    return count.calls, x.grad


def test_attention_qkv_gradient_is_not_copied():
    """Attention's triton backward writes dq, dk, dv as one d_qkv (grouped-query heads too): the
    split hands it on without torch.cat, and it equals what torch's split concatenates."""
    skip_unless_triton_runs("triton", "cpu")
    B, T, H, Hkv, D = 2, 19, 4, 2, 32
    attention = kernels.get("attention", "triton")

    def attend(split):
        def fn(qkv):
            q, k, v = split(qkv, [H * D, Hkv * D, Hkv * D], 2)
            heads = [t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v)]
            return attention(*heads, causal=True).transpose(1, 2).reshape(B, T, H * D)
        return fn
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D)
    torch.manual_seed(0)
    ops, grad = backward_ops(attend(kernels.split), qkv)
    torch.manual_seed(0)
    torch_ops, torch_grad = backward_ops(attend(torch.Tensor.split), qkv)
    assert ops["cat"] == 0 and torch_ops["cat"] == 1
    assert torch.equal(grad, torch_grad)


def test_swiglu_halves_gradient_is_not_copied():
    skip_unless_triton_runs("triton", "cpu")
    swiglu = kernels.get("swiglu", "triton")
    h = torch.randn(3, 5, 2 * 24)
    torch.manual_seed(0)
    ops, grad = backward_ops(lambda h: swiglu(*kernels.split(h, [24, 24], -1)), h)
    torch.manual_seed(0)
    torch_ops, torch_grad = backward_ops(lambda h: swiglu(*h.chunk(2, -1)), h)
    assert ops["cat"] == 0 and torch_ops["cat"] == 1
    assert torch.equal(grad, torch_grad)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_training_step_concatenates_no_gradient_on_triton_ops(preset, compile):
    """The model's backward on every triton op, eager and compiled, joins every split's gradient
    without a copy: LLaMA's too, whose attention turns dq and dk back through RoPE in its own
    gradient buffer. Nor are zero gradients filled for outputs that have none (the ops' statistics,
    attention's turned q, k and v, and, compiled, the logits, which training does not return), nor
    is any tensor cloned or copied. (What Inductor makes of the step: tests/inductor_graph.py.)"""
    skip_unless_triton_runs("triton", "cpu")
    switches = dict(norm="rmsnorm", pos_encoding="rope", mlp="swiglu", n_kv_head=1) if preset == "llama" else {}
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=50, **switches)
    model = GPT(config, {op: "triton" for op in model_ops(config)})
    idx = torch.randint(0, 50, (2, 16))
    _, loss = (compiled(model, "cpu") if compile else model)(idx, idx, return_logits=False)
    with OpCount() as count:
        loss.backward()
    assert count.calls["cat"] == 0 and count.calls["zeros"] == 0
    assert count.calls["clone"] == 0 and count.calls["copy_"] == 0, "a gradient is copied"


def test_a_leafs_gradient_owns_its_memory():
    """A leaf keeps its gradient: torch.cat's backward hands on views of the caller's gradient,
    which joined as a view would become x.grad, and the next backward would accumulate into the
    caller's tensor."""
    x = torch.randn(4, 3, requires_grad=True)
    g = torch.ones(4, 3)
    for _ in range(2):
        torch.cat(kernels.split(x, [2, 1], -1), -1).backward(g)
    assert torch.equal(g, torch.ones(4, 3)) and torch.equal(x.grad, 2 * g)


def test_second_order_gradients_reach_every_part():
    """With create_graph the joined gradient takes part in the graph: each part's gradient must
    be linked to it (a view of the first part alone lost the others')."""
    x = torch.randn(2, 4, requires_grad=True)
    c = torch.arange(8.0).view(2, 4)
    for split in (kernels.split, torch.Tensor.split):
        g = torch.ones(2, 4, requires_grad=True)
        (gx,) = torch.autograd.grad(torch.cat(split(x * 1, [2, 2], -1), -1), x, g, create_graph=True)
        (gg,) = torch.autograd.grad((gx * c).sum(), g)
        assert torch.equal(gg, c), split



def test_slices_that_do_not_start_the_buffer_join_as_a_view():
    buf = torch.randn(3, 12)
    joined = join([buf[:, 2:5], buf[:, 5:9]], 1)
    assert torch.equal(joined, buf[:, 2:9]) and joined.data_ptr() == buf[:, 2:].data_ptr()


def test_parts_of_other_sizes_are_refused_as_torch_cat_refuses_them():
    buf = torch.randn(4, 6)
    for parts, dim in (([buf[:, :2], buf[:3, 2:]], 1), ([buf[:2], buf[2:, :3]], 0)):
        with pytest.raises(RuntimeError):  # not a view of the sizes' union
            join(parts, dim)
