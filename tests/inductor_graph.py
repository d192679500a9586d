"""What Inductor makes of a training step on the triton ops: `python -m tests.inductor_graph`.

torch.compile takes a triton op's kernel launches into its graph (kernels/runtime.py, triton_op)
functionalized: a launch that writes a tensor becomes an op returning a new one, and Inductor's
reinplacing pass makes it write in place again where it can. Where it cannot, the generated code
clones the tensor before the launch and, when the tensor is a view into a bigger buffer, scatters
the result back into that buffer: copies of whole buffers every step, in code nobody reads. (So
it was: the three launches writing d_qkv's heads cost some six copies of d_qkv a layer, the
attention output one more, RoPE's turned q and k and SwiGLU's d_up their own.) This compiles
training steps and fails if Inductor's graphs, after reinplacing, still clone, copy, scatter or
concatenate anything. It also compiles generation with the KV cache (the prompt, then one token
at a time, so Dynamo recompiles with symbolic sizes for the ops' launchers and RoPE's offset).

Inductor's generated code is neither compiled nor run (its kernels are stubs): the graphs are
what count here, not the numbers, and so the check is quick. On a GPU the graphs are those of
that GPU. Without one, the triton ops' kernels are compiled JIT functions launched as on an sm_90
GPU (tests/sm_compile.py's stand-in: each launch compiles, nothing runs), so torch.compile takes
the GPU path; the tensors are CPU ones, for which Inductor writes its own kernels in Triton too
(cpu_backend="triton"), as for a GPU.
"""
import argparse
import collections
import contextlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # the kernels are compiled JIT functions, as on a GPU

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._inductor import async_compile  # noqa: E402
from torch._inductor.fx_passes import post_grad  # noqa: E402

from bench import described  # noqa: E402
from gpt.model import GPT, GPTConfig, KVCache, model_ops  # noqa: E402
from kernels import attention  # noqa: E402
from tests.sm_compile import exit_status, pretend_gpu  # noqa: E402

GPU = torch.cuda.is_available()
LLAMA = dict(norm="rmsnorm", pos_encoding="rope", mlp="swiglu", bias=False)
# name: (model switches, recompute, attention's tiles loaded through TMA descriptors)
CONFIGS = {
    "gpt2": (dict(), False, False),
    "llama-gqa": (LLAMA | dict(n_kv_head=2), False, False),
    "gpt2 dropout recompute": (dict(dropout=0.1), True, False),
    "llama dropout recompute": (LLAMA | dict(dropout=0.1), True, False),
    # as a tuned table may have it (bench/tune_attention.py): the kernels then make tensor
    # descriptors, which Inductor's analysis of what a kernel writes must see through
    "llama-gqa TMA": (LLAMA | dict(n_kv_head=2), False, True),
}
# Graph ops that move a buffer's bytes to another place: none belongs in a training step here.
COPIES = ("aten.clone", "aten.copy", "scatter", "aten.cat")

graphs: list[list[tuple[str, str | None]]] = []  # per graph compiled: (op, kernel launched or None)


def _node(node) -> tuple[str, str | None]:
    """(op, the kernel a launch runs, "TMA" appended where its TMA constexpr is set)."""
    target = str(node.target)
    if "triton_kernel_wrapper" in target:
        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
        args = kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]) | node.kwargs["kwargs"]
        return target, kernel + (" TMA" if args.get("TMA") is True else "")
    return target, None


def _record_after_reinplacing() -> None:
    """Record each graph as Inductor's post-grad passes leave it: the step that turns the launches
    back into writes comes right after reinplacing, which decided what to clone."""
    decompose = post_grad.decompose_triton_kernel_wrapper_functional

    def decompose_and_record(graph):
        decompose(graph)
        graphs.append([_node(n) for n in graph.nodes if n.op == "call_function"])
    post_grad.decompose_triton_kernel_wrapper_functional = decompose_and_record


class _NotRun:
    """A kernel of Inductor's generated code (its own, or a triton op's as Inductor launches it):
    neither compiled nor run. Only the graphs count here; the suite's other compiled tests run
    the code on a GPU."""

    def run(self, *args, **kwargs) -> None:
        pass


def _generate_only() -> None:
    async_compile.AsyncCompile.triton = lambda self, kernel_name, source_code, *args, **kwargs: _NotRun()


@contextlib.contextmanager
def attention_configs(tma: bool):
    """attention's launch configurations, with TMA asked for in every pass if `tma` (where the GPU
    and the tensors allow it: attention._use_tma)."""
    config = attention._config
    if tma:
        attention._config = lambda q, which, dropout=False: config(q, which, dropout)._replace(tma=True)
    try:
        yield
    finally:
        attention._config = config


def small_model(switches: dict, device: str) -> GPT:
    """A 2-layer model (D = 64) on the triton ops it calls, generation's rope among them."""
    config = GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=64, vocab_size=512, **switches)
    return GPT(config, {op: "triton" for op in model_ops(config) | {"rope"}}).to(device)


def training_step_graphs(switches: dict, recompute: bool, tma: bool, device: str) -> list[list[tuple[str, str | None]]]:
    """The graphs (forward, backward) Inductor compiles for a training step of a small model on the
    triton ops, as train.py runs it (bf16 autocast, the loss alone)."""
    model = small_model(switches, device)
    model.recompute_blocks(recompute)
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size), device=device)
    torch._dynamo.reset()
    start = len(graphs)
    with attention_configs(tma):
        with torch.autocast(device, dtype=torch.bfloat16):
            _, loss = torch.compile(model, fullgraph=True)(idx, idx, return_logits=False)
        loss.backward()
    return graphs[start:]


def generation_compiles(switches: dict, device: str) -> str:
    """Calls a compiled model as generation does (GPT.generate, without the sampling): the prompt
    through a KVCache, then one token at a time; returns a line saying so."""
    model = small_model(switches, device).eval()
    cache = KVCache(model.config, batch_size=2)
    idx = torch.randint(0, model.config.vocab_size, (2, 8), device=device)
    torch._dynamo.reset()
    forward = torch.compile(model, fullgraph=True)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        forward(idx[:, :5], cache=cache)
        for t in range(5, 8):
            forward(idx[:, t:t + 1], cache=cache)
    return f"generation compiled: a 5-token prompt, then {cache.length - 5} tokens one at a time"


def problems_of(name: str, step: list[list[tuple[str, str | None]]], tma: bool) -> list[str]:
    """What is wrong with training step `name`'s graphs (a line printed for each graph): copies,
    launches left functional, and no TMA launch where `tma` asked for them."""
    problems = []
    if len(step) != 2:
        problems.append(f"{name}: {len(step)} graphs compiled, not a forward and a backward")
    for which, graph in zip(("forward", "backward"), step):
        launches = collections.Counter(kernel for _, kernel in graph if kernel is not None)
        copies = collections.Counter(op for op, _ in graph if any(c in op for c in COPIES))
        functional = sum(op.endswith("triton_kernel_wrapper_functional") for op, _ in graph)
        # The project's opaque ops (linear_cross_entropy): Inductor calls them whole, kernels and all.
        whole = collections.Counter(op.removesuffix(".default") for op, _ in graph if op.startswith("tritongpt."))
        print(f"{name} {which}: {sum(launches.values())} launches "
              f"({', '.join(f'{k} x{n}' for k, n in sorted(launches.items()))})"
              + "".join(f", {op} x{n} (called whole)" for op, n in sorted(whole.items()))
              + f"; copies: {dict(copies) or 'none'}")
        if copies:
            problems.append(f"{name} {which}: Inductor copies buffers: {dict(copies)}")
        if functional or not launches:
            problems.append(f"{name} {which}: {functional} launches left functional, {len(launches)} kernels")
        if tma and not any(kernel.endswith(" TMA") for kernel in launches):
            problems.append(f"{name} {which}: no launch loads through TMA")
    return problems


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=described(__doc__)).parse_args(argv)  # (--help; it takes no arguments)
    inductor_config.force_disable_caches = True  # a cached graph would skip the passes recorded
    _record_after_reinplacing()
    _generate_only()
    if GPU:
        device = "cuda"
    else:
        pretend_gpu(9)
        inductor_config.cpu_backend = "triton"  # Inductor's kernels for the CPU tensors: as for a GPU's
        device = "cpu"
    problems = []
    tma_loads = not GPU or torch.cuda.get_device_capability()[0] >= 9  # sm90 on (the stand-in's too)
    steps = {name: c for name, c in CONFIGS.items() if tma_loads or not c[2]}
    for name, (switches, recompute, tma) in steps.items():
        problems += problems_of(name, training_step_graphs(switches, recompute, tma, device), tma)
    print("llama-gqa", generation_compiles(CONFIGS["llama-gqa"][0], device))
    where = torch.cuda.get_device_name() if GPU else "sm_90, without a GPU"
    print(f"{len(steps)} training steps compiled by Inductor for {where}, its code generated, not run "
          f"(torch {torch.__version__})")
    return exit_status(problems)


if __name__ == "__main__":
    sys.exit(main())
