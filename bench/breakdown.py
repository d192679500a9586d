"""Where a training step's time goes: device time per kind of work, from torch.profiler.

    times = profile_steps(step, steps=3, device=torch.device("cuda"))  # {kernel name: µs in all}
    split = by_kind(times, steps=3)                                      # {kind: ms a step}

On a GPU the times are its kernels' (and copies') durations, so their sum over a step, set against
the step's wall time, says how long the GPU sat idle waiting for the host (launch overhead, syncs);
on a CPU they are the self times of the ops (what the tests can run). Each name is put in one
kind by the first rule of KINDS it matches: cuBLAS / CUTLASS / nvjet matmuls, flash and cuDNN
attention and this project's Triton kernels, torch's and Inductor's fused kernels all have names
that tell, mostly: an Inductor kernel is named after the ops it fused, so a norm's backward fused
into its neighbours' (add, div, mul, pow, sum) counts as elementwise. bench.mfu divides the
model's matmul and attention FLOPs by the time of those kinds: the rates a kernel engineer checks
first.
"""
import collections
import os
import re

import torch
from torch.autograd import DeviceType

from bench import shown

# (kind, pattern): the first that a name matches, case-insensitive. Order matters where names mix
# words: cuDNN's attention kernels say wgmma, torch's clip_grad_norm says norm (its per-tensor
# vector_norm launches a reduction of NormTwoOps: the optimizer's gradient clipping).
KINDS = (
    ("attention", r"attn|attention|flash|fmha|sdpa"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|s16816|s1688|wgmma|cublas|triton_tem_fused_(add)?mm|aten::(mm|addmm|bmm)$"),
    ("optimizer", r"adam|multi_tensor|foreach|lpnorm|normtwo|vector_norm|sum_squares|sqrt_of_sum"),
    ("loss", r"cross_entropy|softmax|nll_loss"),
    # the embedding's backward sorts the token ids and sums each id's rows by segments (CUB scans
    # and run-length encoding: the only ones in a GPT's step)
    ("embedding", r"embedding|indexselect|index_select|radix|sort|partials_per_segment|partial_segment|"
                  r"compute_grad_weight|sum_and_scatter|devicescan|runlengthencode"),
    # torch's LayerNorm backward (GammaBeta..., RowwiseMoments, ComputeInternalGradients; the
    # apex-style cuComputeGrad...), and RMSNorm as torch and Inductor write it (x * rsqrt(mean))
    ("norm", r"norm|gammabeta|rowwisemoments|computeinternalgradients|cucomputegrad|rsqrt"),
    ("copy", r"memcpy|memset|copy|(^|_|::)cat(_|$)|fill|clone"),
    ("elementwise", r"elementwise|triton_|swiglu|rope|gelu|silu|dropout|reduce|aten::"),
)
OTHER = "other"
# The kinds in the order tables show them: the matmuls first, as they should take most of a step.
SHOWN = ("matmul", "attention", "norm", "loss", "elementwise", "copy", "embedding", "optimizer", OTHER)
_RULES = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in KINDS]


# An Inductor kernel's name lists the ops it fused; these only move data (`_to_copy` is a cast,
# in nearly every bf16 kernel). A kernel of nothing else is a copy; otherwise its other ops say.
_INDUCTOR = re.compile(r"^(triton_(?:poi|red|per)_fused)_(.*?)_\d+$")
_MOVES = {"", "to", "copy", "unsafe", "view", "clone", "cat", "slice", "split", "with", "sizes", "transpose",
          "permute", "expand", "squeeze", "unsqueeze", "select", "t"}


def kind(name: str) -> str:
    """The kind of work a kernel (or, on a CPU, an op) of this name does."""
    if inductor := _INDUCTOR.match(name):
        ops = [op for op in inductor.group(2).split("_") if op not in _MOVES]
        if not ops:
            return "copy"
        name = "_".join([inductor.group(1), *ops])
    return next((k for k, rule in _RULES if rule.search(name)), OTHER)


def profile_steps(step, steps: int, device: torch.device) -> dict[str, float]:
    """Run `step` `steps` times under torch.profiler: the µs of each kernel name in all (on a
    CPU: each op's self time)."""
    cuda = device.type == "cuda"
    # CUPTI stays attached after profiling unless torn down, and slows the kernels timed after it
    # (bench.mfu times its next variants then): pytorch/pytorch#144455, kineto#1539.
    os.environ.setdefault("TEARDOWN_CUPTI", "1")
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    return _times(prof.events(), cuda)


def _times(events, cuda: bool) -> dict[str, float]:
    """µs per name of the profiler's `events`: kernels on a GPU, ops' self time on a CPU. The
    GPU side also lists user annotations (record_function spans such as Optimizer.step#AdamW.step,
    Inductor's "## Call CompiledFxGraph ##") over the kernels they enclose: not work of their own
    (torch's own tables leave them out too: pytorch/pytorch#130730)."""
    times = collections.Counter()
    for e in events:
        if cuda and e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            times[e.name] += e.time_range.elapsed_us()
        elif not cuda and e.device_type == DeviceType.CPU:
            times[e.name] += e.self_cpu_time_total
    return dict(times)


def per_kernel(times: dict[str, float], steps: int) -> dict[str, float]:
    """ms a step of every name, the most first: what a result file keeps, so that a report can
    sort them again by the rules of its day (kinds_of)."""
    return {name: us / 1e3 / steps for name, us in sorted(times.items(), key=lambda item: -item[1])}


def kinds_of(ms: dict[str, float]) -> dict[str, float]:
    """ms of each kind, in SHOWN's order (zeros included), from ms per name."""
    out = dict.fromkeys(SHOWN, 0.0)
    for name, t in ms.items():
        out[kind(name)] += t
    return out


def by_kind(times: dict[str, float], steps: int) -> dict[str, float]:
    """ms a step of each kind, in SHOWN's order (zeros included)."""
    return kinds_of(per_kernel(times, steps))


def top(times: dict[str, float], steps: int, n: int = 12) -> list[dict]:
    """The n names that took the most time: name, kind, ms a step."""
    ranked = sorted(times.items(), key=lambda item: -item[1])[:n]
    return [dict(name=name, kind=kind(name), ms=us / 1e3 / steps) for name, us in ranked]


# Table columns of a summarized breakdown (bench.mfu.summarize adds busy and the two rates).
COLUMNS = ("busy", *SHOWN, "matmul TFLOPS", "attention TFLOPS")


def resorted(summary: dict) -> dict:
    """A summarized breakdown with its kinds sorted again from its kernels' times by today's rules
    (a file that kept them), the matmul and attention rates scaled to their kinds' new times;
    as it was otherwise."""
    if "kernels" not in summary:
        return summary
    ms = kinds_of(summary["kernels"])
    rates = {f"{k}_tflops": (summary[f"{k}_tflops"] * summary["ms"][k] / ms[k]
                             if summary.get(f"{k}_tflops") and ms[k] > 0 else None) for k in ("matmul", "attention")}
    return dict(summary, ms=ms, **rates)


def cells(summary: dict) -> list[str]:
    """A summarized breakdown as table cells under COLUMNS, its kinds by today's rules where it
    kept its kernels' times (resorted)."""
    summary = resorted(summary)

    return [f"{100 * summary['busy']:.0f}%", *(f"{summary['ms'][k]:.2f}" for k in SHOWN),
            shown(summary["matmul_tflops"], ".0f"), shown(summary["attention_tflops"], ".0f")]
