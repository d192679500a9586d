import collections
import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

import kernels
from gpt.model import GPT, PRESETS, GPTConfig, KVCache, model_ops, preset, rope_tables
from gpt.optim import BF16AdamW, clip_for_step
from kernels import adamw, runtime
from kernels.accuracy import rel_err
from tests.devices import compiled, cuda_only, interpreter_only, no_host_syncs, skip_unless_triton_runs
from tests.memory import saved_bytes


def expected_params(c: GPTConfig) -> int:
    """Parameter count from the architecture, written out independently of the model code."""
    d, hidden, L = c.n_embd, c.mlp_hidden, c.n_layer
    n_kv = c.n_kv_head or c.n_head
    norm = d * (2 if c.norm == "layernorm" and c.bias else 1)
    qkv = d * (c.n_head + 2 * n_kv) * (d // c.n_head) + (d // c.n_head) * (c.n_head + 2 * n_kv) * c.bias
    proj = d * d + d * c.bias
    fc_out = hidden * (2 if c.mlp == "swiglu" else 1)
    mlp = d * fc_out + fc_out * c.bias + hidden * d + d * c.bias
    block = 2 * norm + qkv + proj + mlp
    emb = c.vocab_size * d + (c.block_size * d if c.pos_encoding == "learned" else 0)
    head = 0 if c.tie_weights else c.vocab_size * d
    final_norm = norm if c.norm_position == "pre" else 0
    return emb + L * block + final_norm + head


@pytest.mark.parametrize("name,total", [("gpt2", 124_475_904), ("shakespeare-char", 10_745_088),
                                        ("llama", 162_220_800), ("gpt2-medium", 354_871_296)])
def test_preset_parameter_counts_are_exact(name, total):
    config = GPTConfig(**preset(name))
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() == total == expected_params(config)


def test_gpt2_matches_nanogpt_count():
    # nanoGPT prints 123.69M for GPT-2 at vocab 50257: all parameters but the position embeddings.
    with torch.device("meta"):
        model = GPT(GPTConfig(**(preset("gpt2") | {"vocab_size": 50257})))
    assert model.num_params() - model.wpe.weight.numel() == 123_653_376


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_weights_start_as_gpt2s_init(mlp):
    """N(0, 0.02) for every matmul weight and embedding, 0.02 / sqrt(2 n_layer) for the residual
    projections (attention's and the MLP's c_proj), zero biases, unit norm weights."""
    n_layer = 8
    model = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=256, block_size=64, vocab_size=512, mlp=mlp,
                          tie_weights=False))
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
            continue
        std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
        assert abs(p.mean()) < 0.05 * std and abs(p.std() / std - 1) < 0.05, name  # (16k samples or more)


def test_non_embedding_count_leaves_out_both_embeddings_and_no_other_weight():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50, pos_encoding="learned"))
    assert model.num_params() - model.num_params(non_embedding=True) == 50 * 16 + 8 * 16
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50, pos_encoding="rope"))
    assert model.num_params() - model.num_params(non_embedding=True) == 50 * 16


def test_every_preset_builds():
    for name in PRESETS:
        with torch.device("meta"):
            GPT(GPTConfig(**preset(name)))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt5")


SWITCHES = [dict(norm=n, norm_position=p, pos_encoding=e, mlp=m, bias=b, tie_weights=t, n_kv_head=kv)
            for n, p, e, m, b, t, kv in itertools.product(
                ["layernorm", "rmsnorm"], ["pre", "post"], ["learned", "rope", "none"], ["gelu", "swiglu"],
                [True, False], [True, False], [None, 2])][::7]  # a spread of the 192 combinations


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_forward_backward_every_switch(switches):
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50, dropout=0.1, **switches)
    model = GPT(config)
    assert model.num_params() == expected_params(config)
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 50)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    logits, loss = model(idx[:, :5])
    assert logits.shape == (3, 1, 50) and loss is None


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_model_ops_are_the_ops_it_calls(switches):
    """model_ops(config), which decides which ops a run self-checks, is what training calls as
    train.py runs it, and model_ops(config, generation=True) what generation calls."""
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50, **switches)
    model = GPT(config)
    called = set()
    for op in kernels.OPS:
        fn = getattr(model.ops, op)
        setattr(model.ops, op, lambda *args, op=op, fn=fn, **kw: called.add(op) or fn(*args, **kw))
    idx = torch.randint(0, 50, (2, 16))
    model(idx, idx, return_logits=False)[1].backward()
    assert called == model_ops(config)
    called.clear()
    with torch.no_grad():
        model.generate(idx[:, :4], 3)
    assert called == model_ops(config, generation=True)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_branch_dropout_happens_in_the_norms(norm_position):
    """nanoGPT's dropout of each attention and MLP output happens where the norm adds the branch
    to the stream, once per branch, only in training; the embeddings' keeps its own module."""
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50, dropout=0.3,
                       norm_position=norm_position)
    model = GPT(config)
    assert [m for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [model.drop]
    calls = []
    fn = model.ops.layer_norm
    model.ops.layer_norm = lambda *args, **kw: calls.append((kw.get("residual") is not None,
                                                             kw.get("dropout_p", 0.0))) or fn(*args, **kw)
    idx = torch.randint(0, 50, (2, 16))
    model(idx, idx)
    branches = 2 * config.n_layer  # every attention and MLP output
    assert sorted(calls) == [(False, 0.0)] * (len(calls) - branches) + [(True, 0.3)] * branches
    calls.clear()
    model.eval()
    model(idx, idx)
    assert all(p == 0.0 for _, p in calls)


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu"])
def test_plain_mlp_activations(activation):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, activation=activation))
    _, loss = model(torch.randint(0, 20, (2, 8)), torch.randint(0, 20, (2, 8)))
    assert torch.isfinite(loss)


def test_fresh_model_predicts_uniformly():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65))
    _, loss = model(torch.randint(0, 65, (4, 16)), torch.randint(0, 65, (4, 16)))
    assert abs(loss.item() - torch.log(torch.tensor(65.0)).item()) < 0.1


def test_causality():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, pos_encoding="rope")).eval()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_training_forward_returns_no_logits():
    """return_logits=False (train.py's call): no logits, the same loss."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    idx = torch.randint(0, 50, (2, 16))
    logits, loss = model(idx, idx)
    none, same = model(idx, idx, return_logits=False)
    assert logits.shape == (2, 16, 50) and none is None and torch.equal(loss, same)


class LoRAHead(torch.nn.Module):
    """A head as LoRA wraps it: the Linear's output plus a low-rank correction."""
    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base, self.weight = base, base.weight
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features))
        self.B = torch.nn.Parameter(torch.randn(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.A.T @ self.B.T


@pytest.mark.parametrize("head", ["hooked", "global-hook", "lora", "parametrized"])
def test_the_training_loss_calls_a_head_that_is_more_than_its_weight(head, monkeypatch, request):
    """return_logits=False fuses the head into the loss only where the head is x @ weight.T (a
    parametrization of the weight is taken as it reads): a head with a hook of its own, or under
    a global one, or wrapped (LoRA), is called, and the loss and every gradient are those with the
    logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    if head == "hooked":
        model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    elif head == "global-hook":
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda module, args, out: out * 2 if module is model.lm_head else None)
        request.addfinalizer(hook.remove)
    elif head == "lora":
        model.lm_head = LoRAHead(model.lm_head)
    else:
        torch.nn.utils.parametrize.register_parametrization(model.lm_head, "weight", torch.nn.Tanh())
    fused = []
    monkeypatch.setattr(model.ops, "linear_cross_entropy",
                        lambda *args: fused.append(1) or kernels.get("linear_cross_entropy")(*args))
    idx = torch.randint(0, 50, (2, 16))
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        _, loss = model(idx, idx, return_logits=return_logits)
        loss.backward()
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (same, same_grads) = results
    torch.testing.assert_close(same, loss)
    for a, b in zip(grads, same_grads):
        torch.testing.assert_close(b, a)
    assert len(fused) == (head == "parametrized")


def test_the_head_stays_tied_through_meta_moves_and_assigned_loads():
    """to_empty, a move to or from meta and load_state_dict(assign=True) give each module a
    Parameter of its own: the model ties the head to the token embedding again after each."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50)
    model = GPT(config)
    n = model.num_params()
    with torch.device("meta"):
        empty = GPT(config)
    for moved in (empty.to_empty(device="cpu"), GPT(config).to("meta")):
        assert moved.lm_head.weight is moved.wte.weight and moved.num_params() == n
    empty.load_state_dict(model.state_dict(), assign=True)
    assert empty.lm_head.weight is empty.wte.weight and torch.equal(empty.wte.weight, model.wte.weight)
    untied = GPT(dataclasses.replace(config, tie_weights=False)).to("meta")
    assert untied.lm_head.weight is not untied.wte.weight


def test_an_untied_checkpoint_is_refused_by_a_tied_model():
    """A tied model would keep whichever of two different matrices loads last; it refuses them and
    says how to load both. The same values under both names (nanoGPT's checkpoints) load."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50)
    untied = GPT(dataclasses.replace(config, tie_weights=False)).state_dict()
    for assign in (False, True):
        model = GPT(config)
        before = {name: t.clone() for name, t in model.state_dict().items()}
        with pytest.raises(RuntimeError, match="lm_head.weight differs from wte.weight.*tie_weights=False"):
            model.load_state_dict(untied, assign=assign)
        assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())  # nothing loaded
    same = {name: t.clone() for name, t in GPT(config).state_dict().items()}  # two tensors, one matrix
    same["wte.weight"][3, 0] = same["lm_head.weight"][3, 0] = float("nan")  # a diverged run's own
    model = GPT(config)
    model.load_state_dict(same)
    assert model.lm_head.weight is model.wte.weight
    torch.testing.assert_close(model.wte.weight.detach(), same["wte.weight"], rtol=0, atol=0, equal_nan=True)
    GPT(dataclasses.replace(config, tie_weights=False)).load_state_dict(untied)


@pytest.mark.parametrize("head", ["classifier", "untied", "parametrized", "sequential"])
def test_a_head_untied_or_replaced_on_purpose_stays_so(head):
    """Only a tied head is tied again after a move or a load: one the user replaced (a
    classifier's, a Sequential), untied or parametrized keeps its own weights through .to(),
    .float() and load_state_dict."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50)
    model = GPT(config)
    if head == "classifier":
        model.lm_head = torch.nn.Linear(32, 3, bias=False)
    elif head == "untied":
        model.lm_head.weight = torch.nn.Parameter(model.wte.weight.detach() + 1)
    elif head == "parametrized":
        torch.nn.utils.parametrize.register_parametrization(model.lm_head, "weight", torch.nn.Tanh())
    else:
        model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, 50, bias=False))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    model.to("cpu").float().load_state_dict(before)
    assert model.lm_head(torch.zeros(1, 32)).shape[-1] == (3 if head == "classifier" else 50)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert head == "parametrized" or not any(p is model.wte.weight for p in model.lm_head.parameters())


def test_model_uses_the_chosen_backends():
    calls = []
    backends = {op: c.backend for op, c in kernels.choose("torch", "cpu").items()}
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20), backends)
    assert model.ops.backends == backends
    model.ops.layer_norm = lambda *args, **kw: calls.append("layer_norm") or kernels.get("layer_norm")(*args, **kw)
    model(torch.randint(0, 20, (1, 8)))
    assert calls.count("layer_norm") == 3  # two per block, one final
    with pytest.raises(ValueError, match="unknown ops"):
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20), {"softmax": "torch"})


def unfused_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The model's logits as nanoGPT computes them: each residual add its own op before the norm."""
    T = idx.size(1)
    x = model.wte(idx)
    if model.wpe is not None:
        x = x + model.wpe(torch.arange(T, device=idx.device))
    c = model.config
    rope = rope_tables(c.head_dim, T, c.rope_theta, idx.device) if c.pos_encoding == "rope" else None
    for b in model.h:
        if b.pre_norm:
            x = x + b.attn(b.ln_1(x), rope)
            x = x + b.mlp(b.ln_2(x))
        else:
            x = b.ln_1(x + b.attn(x, rope))
            x = b.ln_2(x + b.mlp(x))
    if model.ln_f is not None:
        x = model.ln_f(x)
    return model.lm_head(x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
@pytest.mark.parametrize("switches", [dict(), dict(norm="rmsnorm", pos_encoding="rope", mlp="swiglu", bias=False),
                                      dict(norm_position="post")], ids=["gpt2", "llama", "post-norm"])
def test_fused_residual_adds_change_nothing(backend, autocast, switches, device):
    """The adds fused into the norms (and under autocast the norms' bf16 outputs) give the logits
    and gradients of nanoGPT's separate adds and norms. The torch ops, and the triton ops in the
    interpreter in fp32, do the same roundings in another order: the same numbers. A GPU may
    contract the triton backward's added gradient into an FMA: there, rounding-level
    differences. Under autocast too: the interpreter's casts to bf16 round to nearest, as
    autocast's (runtime.round_bf16_casts)."""
    skip_unless_triton_runs(backend, device)
    config = GPTConfig(n_layer=2, n_head=1, n_embd=32, block_size=16, vocab_size=50, **switches)
    model = GPT(config, {op: backend for op in ("rms_norm", "layer_norm", "swiglu", "attention")}).to(device)
    idx = torch.randint(0, 50, (2, 16), device=device)
    results = []
    for forward in (lambda: model(idx, idx)[0], lambda: unfused_forward(model, idx)):
        model.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = forward()
        logits.float().square().mean().backward()
        results.append([logits] + [p.grad.clone() for p in model.parameters()])
    names = ["logits"] + [n for n, _ in model.named_parameters()]
    for name, fused, unfused in zip(names, *results, strict=True):
        if backend == "triton" and device == "cuda":
            assert rel_err(fused, unfused.double()) < (1e-2 if autocast else 1e-5), name
        else:
            assert torch.equal(fused, unfused), f"{name}: fused and unfused differ"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("switches", [dict(), dict(norm="rmsnorm", pos_encoding="rope", mlp="swiglu", bias=False),
                                      dict(norm_position="post")], ids=["gpt2", "llama", "post-norm"])
def test_recomputed_blocks_give_the_same_gradients(backend, switches, device):
    """recompute_blocks: the same loss and gradients (dropout, in attention too, replayed from the
    saved random state), and the blocks' activations no longer saved by the forward: all blocks'
    (True), or the first one's (1)."""
    skip_unless_triton_runs(backend, device)
    config = GPTConfig(n_layer=3, n_head=1, n_embd=32, block_size=16, vocab_size=50, dropout=0.2, **switches)
    model = GPT(config, {op: backend for op in ("rms_norm", "layer_norm", "swiglu", "rope", "attention")}).to(device)
    idx = torch.randint(0, 50, (2, 16), device=device)
    results = []
    for recompute, count in ((False, 0), (True, 3), (1, 1)):
        model.recompute_blocks(recompute)
        assert model.recomputed == count and model.h[0].recompute == bool(count)
        model.zero_grad()
        torch.manual_seed(0)
        saved, _copies, loss = saved_bytes(model, idx)
        loss.backward()
        results.append((saved, loss, [p.grad.clone() for p in model.parameters()]))
    (full, loss, grads), *recomputed = results
    for _, loss_again, grads_again in recomputed:
        assert torch.equal(loss, loss_again)
        for (name, _), g, g_again in zip(model.named_parameters(), grads, grads_again, strict=True):
            assert torch.equal(g, g_again), name
    kept, kept_two = recomputed[0][0], recomputed[1][0]
    assert kept < full / 3 and kept < kept_two < full


def test_recompute_takes_true_false_or_a_block_count():
    model = GPT(GPTConfig(n_layer=2, n_head=1, n_embd=16, block_size=8, vocab_size=16))
    for bad in (3, -1, 1.5, "all"):
        with pytest.raises(ValueError, match=r"recompute: True, False or a number of blocks from 0 to 2"):
            model.recompute_blocks(bad)


TRITON_OPS = ("rms_norm", "layer_norm", "swiglu", "rope", "attention", "cross_entropy", "linear_cross_entropy")


@pytest.mark.parametrize("switches,recompute", [
    (dict(), False), (dict(norm="rmsnorm", pos_encoding="rope", mlp="swiglu", bias=False, n_kv_head=1), True)],
    ids=["gpt2", "llama-gqa-recompute"])
def test_compiled_model_on_triton_ops_trains_as_eager(switches, recompute, device):
    """The model on every triton op traces into one graph (fullgraph: no break in the model or in
    the ops), dropout and recomputed blocks included, and gives eager's loss and gradients. On
    CPU the graph runs its ops as they are, split by Inductor's partitioner (which decides what a
    recomputed block runs again, its dropout seeds included): the same numbers. On a GPU
    Inductor fuses the torch ops around the kernels in its own way, and draws its own dropout
    seeds: no dropout there, and rounding-level differences under bf16 autocast."""
    skip_unless_triton_runs("triton", device)
    dropout = 0.2 if device == "cpu" else 0.0
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=50, dropout=dropout, **switches)
    model = GPT(config, {op: "triton" for op in TRITON_OPS}).to(device)
    model.recompute_blocks(recompute)
    idx = torch.randint(0, 50, (2, 16), device=device)
    results = []
    for forward in (model, compiled(model, device)):
        model.zero_grad()
        torch.manual_seed(0)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            _, loss = forward(idx, idx, return_logits=False)  # as train.py calls it
        loss.backward()
        results.append([loss] + [p.grad.clone() for p in model.parameters()])
    names = ["loss"] + [n for n, _ in model.named_parameters()]
    for name, eager, graphed in zip(names, *results, strict=True):
        if device == "cuda":
            assert rel_err(graphed, eager.double()) < 2e-2, name
        else:
            assert torch.equal(graphed, eager), f"{name}: compiled and eager differ"


@cuda_only
@pytest.mark.parametrize("switches", [dict(), dict(norm="rmsnorm", pos_encoding="rope", mlp="swiglu", bias=False,
                                                    n_kv_head=1)], ids=["gpt2", "llama-gqa"])
def test_training_step_on_triton_ops_never_syncs(switches):
    """A training step as train.py runs it on every triton op (dropout, clipping, BF16AdamW) never
    waits for the GPU: the host can queue the next step while this one runs, which is all that
    keeps an eager step's short kernels busy. Grads come at new addresses each step here (the
    last step's are kept), so the optimizer's pointer tables are made anew too."""
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=50, dropout=0.1, **switches)
    backends = {op: "triton" for op in TRITON_OPS + ("grad_norm", "adamw")}
    model = GPT(config, backends).to("cuda", torch.bfloat16)
    params = list(model.parameters())
    optimizer = BF16AdamW(model.param_groups(0.1), lr=1e-3, backend="triton")
    idx = torch.randint(0, 50, (2, 16), device="cuda")
    kept = []

    def step():
        _, loss = model(idx, idx, return_logits=False)
        loss.backward()
        clip_for_step(optimizer, params, 1.0, kernels.get("grad_norm", "triton"))
        optimizer.step()
        kept.append([p.grad for p in params])
        optimizer.zero_grad(set_to_none=True)
    step()  # compiles and loads the kernels
    made = adamw.tables_made()
    with no_host_syncs():
        step()
        step()
    assert adamw.tables_made() >= made + 4  # grad_norm's and the step's, each step


# Kernel launches of a training step's forward and backward on every triton op: per block, and
# once a step (the final norm, the fused loss). Each launch costs host time that an eager step's
# short kernels may not hide (the H200 runs: the GPU busy 57-82% of such a step).
LAUNCHES_PER_BLOCK = {
    "gpt2": {"_norm_fwd_kernel": 2, "_norm_bwd_kernel": 2, "_norm_sum_partials_kernel": 2, "_attn_fwd": 1,
             "_attn_bwd_delta": 1, "_attn_bwd_dkdv": 1, "_attn_bwd_dq": 1},
    # RoPE: q and k turned and v copied beside them in one forward launch, dq and dk turned back in one
    "llama-gqa": {"_norm_fwd_kernel": 2, "_norm_bwd_kernel": 2, "_norm_sum_partials_kernel": 2, "_rope_kernel": 2,
                  "_attn_fwd": 1, "_attn_bwd_delta": 1, "_attn_bwd_dkdv": 1, "_attn_bwd_dq": 1,
                  "_swiglu_fwd_kernel": 1, "_swiglu_bwd_kernel": 1}}
LAUNCHES_PER_STEP = {"_norm_fwd_kernel": 1, "_norm_bwd_kernel": 1, "_norm_sum_partials_kernel": 1,
                     "_cross_entropy_fwd_kernel": 1, "_cross_entropy_bwd_kernel": 1}


@interpreter_only
@pytest.mark.parametrize("name,switches", [
    ("gpt2", dict()), ("llama-gqa", dict(norm="rmsnorm", pos_encoding="rope", mlp="swiglu", bias=False, n_kv_head=1))])
def test_training_step_launches(name, switches, monkeypatch):
    """The kernels a forward and backward on every triton op launch, counted at one block and at
    two: no launch added unnoticed (the interpreter's launches are counted; a GPU's are the same
    calls)."""
    launched = collections.Counter()

    class Counted(runtime._InterpretedLaunch):
        def __getitem__(self, grid):
            launched[self.kernel.fn.__name__] += 1
            return super().__getitem__(grid)
    monkeypatch.setattr(runtime, "_InterpretedLaunch", Counted)
    counts = []
    for n_layer in (1, 2):
        config = GPTConfig(n_layer=n_layer, n_head=2, n_embd=64, block_size=16, vocab_size=50, dropout=0.1,
                           **switches)
        model = GPT(config, {op: "triton" for op in TRITON_OPS}).to(torch.bfloat16)
        idx = torch.randint(0, 50, (2, 16))
        launched.clear()
        model(idx, idx, return_logits=False)[1].backward()
        counts.append(launched.copy())
    one, two = counts
    per_block = two - one
    assert per_block == LAUNCHES_PER_BLOCK[name]
    assert one == per_block + collections.Counter(LAUNCHES_PER_STEP)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(n_head=12, n_kv_head=5)
    for key, value, message in (("block_size", 0, "block_size must be at least 1, got 0"),
                                ("n_layer", -1, "n_layer must be at least 1, got -1"),
                                ("mlp_hidden", 0, "mlp_hidden must be at least 1, got 0"),
                                ("dropout", 1.0, r"dropout must be in \[0, 1\), got 1.0"),
                                ("norm_eps", 0.0, "norm_eps and rope_theta must be above 0")):
        with pytest.raises(ValueError, match=message):
            GPTConfig(**{key: value})
    for n_head, n_kv_head in ((0, None), (4, 0), (4, -2), (4, 8)):
        with pytest.raises(ValueError, match="n_head must be at least 1 and n_kv_head from 1 to n_head"):
            GPTConfig(n_embd=32, n_head=n_head, n_kv_head=n_kv_head)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    # Token ids the embedding has no row for (an IndexError, or on a GPU a device-side assert), and
    # an empty batch or sequence (an IndexError, or a NaN loss).
    for idx, message in ((torch.tensor([[3, 20]]), r"token ids must be in \[0, 20\), got ids from 3 to 20"),
                         (torch.tensor([[-1, 4]]), r"token ids must be in \[0, 20\), got ids from -1 to 4"),
                         (torch.zeros(1, 0, dtype=torch.long), r"idx must hold at least one sequence of at least one "
                                                                r"token, got shape \(1, 0\)"),
                         (torch.zeros(0, 4, dtype=torch.long), r"got shape \(0, 4\)")):
        with pytest.raises(ValueError, match=f"^GPT: .*{message}"):
            model(idx, idx)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # fake ids have no values to check
        assert model(mode.from_tensor(torch.zeros(1, 4, dtype=torch.long)))[0].shape == (1, 1, 20)
    # A gated MLP of another activation (ReGLU) is not what swiglu builds: refused, not ignored.
    with pytest.raises(ValueError, match="mlp='swiglu' gates with silu; activation 'relu' is the plain MLP's"):
        GPTConfig(mlp="swiglu", activation="relu")
    assert GPTConfig(mlp="swiglu", activation="silu").mlp == "swiglu"
    # Sizes are counts: a float or a bool would fail deep in the layers (or build one layer).
    for key, value in (("n_layer", 2.0), ("n_embd", 32.0), ("n_head", 2.0), ("block_size", 8.0),
                       ("vocab_size", 20.0), ("n_layer", True), ("n_kv_head", 1.0), ("mlp_hidden", 64.0)):
        with pytest.raises(ValueError, match=f"GPTConfig: {key} must be an int"):
            GPTConfig(**{key: value})
    sizes = GPTConfig(n_layer=np.int64(2), n_embd=np.int32(32), n_head=np.int64(2), n_kv_head=np.int8(1))
    assert [type(getattr(sizes, key)) for key in ("n_layer", "n_embd", "n_head", "n_kv_head")] == [int] * 4


def test_weight_decay_groups():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    decay, no_decay = model.param_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def test_generate_extends_the_prompt():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20)).eval()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=10, top_k=5)
    assert out.shape == (2, 13) and out.max() < 20
    for bad, message in ((dict(top_k=0), "top_k must be at least 1"), (dict(top_k=5.0), "top_k must be at least 1"),
                         (dict(temperature=-1.0), "temperature must be finite and >= 0"),
                         (dict(temperature=float("nan")), "temperature must be finite and >= 0"),
                         (dict(temperature=float("inf")), "temperature must be finite and >= 0"),
                         (dict(vocab_limit=0), "vocab_limit must be at least 1, got 0"),
                         (dict(max_new_tokens=3.0), "max_new_tokens must be an int"),
                         (dict(max_new_tokens=-5), "max_new_tokens must be at least 0, got -5"),  # sampled none
                         (dict(vocab_limit=10.0), "vocab_limit must be an int"),
                         (dict(top_k=True), "top_k must be"), (dict(temperature=True), "temperature must be")):
        with pytest.raises(ValueError, match=f"GPT.generate: {message}"):
            model.generate(torch.zeros(1, 1, dtype=torch.long), **(dict(max_new_tokens=2) | bad))
    with pytest.raises(ValueError, match="block_size must be an int"):
        model.crop_block_size(4.0)
    assert model.config.block_size == 8 and model.wpe.weight.shape[0] == 8  # refused before any change


KV_SWITCHES = [dict(), dict(norm="rmsnorm", pos_encoding="rope", mlp="swiglu", bias=False, n_kv_head=2),
               dict(norm_position="post", pos_encoding="none", n_kv_head=1)]


@pytest.mark.parametrize("switches", KV_SWITCHES, ids=["gpt2", "llama-gqa", "post-nopos-mqa"])
def test_kv_cache_gives_the_full_forwards_logits(switches):
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50, **switches)).eval()
    idx = torch.randint(0, 50, (3, 16))
    cache = KVCache(model.config, batch_size=3)
    with torch.no_grad():
        # a one-token prompt (BPE's <|endoftext|> start), single tokens, chunks of three (each query
        # sees the keys up to its own)
        for start, end in [(0, 1), (1, 2), (2, 5), (5, 6), (6, 7), (7, 10), (10, 11), (11, 16)]:
            cached, _ = model(idx[:, start:end], cache=cache)
            full, _ = model(idx[:, :end])
            torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
        assert cache.length == 16
        with pytest.raises(ValueError, match="longer than block_size"):
            model(idx[:, :1], cache=cache)
    with pytest.raises(ValueError, match="for inference"):
        model(idx[:, :2], idx[:, :2], cache=KVCache(model.config, batch_size=3))


@pytest.mark.parametrize("kv_cache", [True, False])
def test_generate_runs_the_prompt_once_then_single_tokens_then_the_whole_window(kv_cache, monkeypatch):
    """README: with the cache the prompt runs once, then each new token alone; past block_size
    (and always without the cache) each token runs the last block_size tokens."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20)).eval()
    lengths, forward = [], GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, idx, *a, **k: lengths.append(idx.size(1))
                        or forward(self, idx, *a, **k))
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=9, kv_cache=kv_cache)
    assert out.shape == (1, 12)
    # the prompt (3), then contexts of 4 .. 11 tokens: 4 .. 8 fit block_size 8, 9 .. 11 slide
    assert lengths == ([3, 1, 1, 1, 1, 1, 8, 8, 8] if kv_cache else [3, 4, 5, 6, 7, 8, 8, 8, 8])


@pytest.mark.parametrize("switches", KV_SWITCHES, ids=["gpt2", "llama-gqa", "post-nopos-mqa"])
def test_generate_samples_the_same_with_and_without_the_kv_cache(switches):
    """Past block_size (16) too, where the window slides and the cache is left."""
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50, **switches)).eval()
    prompt = torch.randint(0, 50, (2, 5))
    out = []
    for kv_cache in (True, False):
        torch.manual_seed(0)
        out.append(model.generate(prompt, max_new_tokens=20, kv_cache=kv_cache))
    assert out[0].shape == (2, 25) and torch.equal(out[0], out[1])


@pytest.mark.parametrize("training", [True, False])
def test_kv_cache_drops_attention_weights_as_the_full_forward_does(training, monkeypatch):
    """A model generating in training mode (GPT.generate leaves the mode to its caller, as
    nanoGPT's) drops attention weights in the cached single-token steps as in the prompt's
    forward and in every step without the cache; in eval mode in none."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, dropout=0.3))
    model.train(training)
    rates, sdpa = [], torch.nn.functional.scaled_dot_product_attention  # the torch attention op's too
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, dropout_p=0.0, **k: rates.append(dropout_p) or sdpa(*a, dropout_p=dropout_p, **k))
    with torch.no_grad():
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4)
    assert rates == [0.3 if training else 0.0] * 4


@interpreter_only
def test_kv_cache_with_triton_kernels_and_bf16_autocast():
    """The prompt goes through the registry's attention (here triton's), the next tokens through
    SDPA over the cache, which is kept in the dtype autocast computes k and v in."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=8, vocab_size=50, norm="rmsnorm",
                       pos_encoding="rope", mlp="swiglu", bias=False)
    model = GPT(config, kernels={op: "triton" for op in ("rms_norm", "rope", "swiglu", "attention")}).eval()
    idx = torch.randint(0, 50, (2, 8))
    cache = KVCache(config, batch_size=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx[:, :6], cache=cache)
        cached, _ = model(idx[:, 6:], cache=cache)
        full, _ = model(idx)
    assert cache.keys[0].dtype == torch.bfloat16
    torch.testing.assert_close(cached.float(), full.float(), rtol=0.05, atol=0.05)


def test_pure_bf16_model_trains_a_step():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, pos_encoding="rope",
                          norm="rmsnorm", mlp="swiglu")).to(torch.bfloat16)
    _, loss = model(torch.randint(0, 20, (2, 8)), torch.randint(0, 20, (2, 8)))
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_rope_tables_are_made_once_in_fp32():
    """The cos and sin tables are buffers made with the model (not in forward, where
    torch.compile fused their pow, cos and sin into the rotation of every element of q and k),
    stay fp32 when the model is cast to bf16, and are sliced with the context."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, pos_encoding="rope")
    model = GPT(config).to(torch.bfloat16)
    cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
    assert model.rope_cos.dtype == torch.float32 and torch.equal(model.rope_cos, cos)
    assert torch.equal(model.rope_sin, sin)
    assert "rope_cos" not in model.state_dict()

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    idx = torch.randint(0, 64, (2, 8))
    torch.compile(GPT(config), backend=record, fullgraph=True)(idx, idx)
    called = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op in ("call_function", "call_method")}
    assert not any("cos" in name or "sin" in name for name in called), called

    with torch.device("meta"):  # built without memory, then given it: the tables are made again
        empty = GPT(config)
    assert empty.rope_cos.is_meta
    assert torch.equal(empty.to_empty(device="cpu").rope_cos, cos)

    twin = GPT(config)  # built from the same config: another model's crop leaves it as it was
    model.crop_block_size(8)
    assert model.rope_cos.shape == (8, config.head_dim // 2)
    assert config.block_size == twin.config.block_size == 16 and model.config.block_size == 8
    assert GPT(dataclasses.replace(config, pos_encoding="learned")).rope_cos is None


def test_rope_tables_round_exact_angles_once():
    """At long contexts fp32 angles pos·freq are off by up to 1e-3 of a radian (16k positions);
    the tables are the float64 values rounded once to fp32."""
    D, T, theta = 128, 16384, 500000.0
    cos, sin = rope_tables(D, T, theta)
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    assert cos.dtype == sin.dtype == torch.float32
    assert (cos.double() - angles.cos()).abs().max() <= 2**-24 and (sin.double() - angles.sin()).abs().max() <= 2**-24
