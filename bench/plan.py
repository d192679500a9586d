"""Planning without the GPU: FLOPs, memory per GPU, the largest micro-batch that fits, and
tokens/s at a range of MFU, for any preset or train.py config file on any GPU of the peak table.

Memory per GPU (bytes), for P parameters on N GPUs:
- static: weights, grads and optimizer states. adamw (torch AdamW, fp32 weights, bf16
  autocast) keeps 4 + 4 + 8 bytes per parameter; bf16_adamw (pure bf16) 2 + 2 + 4, and 2
  more with kahan_summation (its compensation). DDP replicates all of it; ZeRO-1 shards the
  optimizer states, but torch's ZeroRedundancyOptimizer gives each rank whole parameters (each
  group's largest first, to the least-loaded rank), so the fullest rank, which the plan counts,
  holds more than 1/N: at least the largest parameter's. FSDP shards all three (/N) and holds
  two blocks' weights gathered in bf16 (the one computing and the one prefetched), and the root
  unit's (embeddings, final norm, an untied head), which FSDP keeps gathered from forward to
  backward. While a block's grads are reduce-scattered (FSDP2's foreach_reduce) it also holds
  them whole, in the bf16 of the gathered weights, and the whole reduce-scatter input they are
  copied into, in the reduce dtype (the sharded grads': fp32 for adamw, train.py's reduce_dtype,
  bf16 for bf16_adamw): 2 + 4 or 2 + 2 bytes per block parameter.
  Under autocast outside FSDP, each step also holds the bf16 copies autocast makes of the
  layers' matmul weights, which autograd keeps for backward: 2 bytes per matmul weight.
- activations, per token of a micro-batch, saved for the backward with no recomputation,
  dropout 0 and flash attention (no T x T scores). Per layer, in bf16 unless said:
      norm outputs 2h + q, k, v (qkv width) + attention output h + MLP up-projection output
      (hidden, or 2·hidden for SwiGLU) + activation output (hidden)
      + the two norm inputs, which are the residual stream: fp32 under autocast, bf16 pure
        and under FSDP (its weights gathered in bf16 make the embeddings' sum bf16)
      (with RoPE, the turned q and k and a copy of v in their place: the projection output goes);
  that is 32·h bytes for a GPT-2 layer in pure bf16 (Korthikanti et al. 2022's 34·h without
  the dropout masks). The head adds the final norm's input (r bytes) and, with the triton
  linear_cross_entropy (the planned case), the gradient of the norm's output in fp32 (4h), which
  that op computes in the forward with the weight's, so that no logits are kept (kernels/
  cross_entropy.py). Whatever the micro-batch, the op keeps the weight's gradient in fp32 for
  the backward, and in the head's forward also holds one chunk's share of it and at most one
  chunk of logits (1 GiB): 8·vocab·h + 1 GiB, held_bytes counts them. With torch's
  linear_cross_entropy instead (fused_loss=False: kernels=torch, or a fallback) the head holds,
  at the start of its backward, the fp32 log-softmax of the logits it saved and two fp32
  gradients of them (nll_loss's and log_softmax's): UNFUSED_LOSS_BYTES = 12·vocab a token
  (measured on CPU under bf16 autocast), and none of the fused op's buffers.
  With activation recomputation (train.py's recompute: True checkpoints every block, n the first
  n) a recomputed block keeps only its inputs (the residual stream, r bytes, and but for the
  first block the branch output the fused norm has yet to add, 2). Recomputing it holds one
  block's activations again, which raises the peak only when every block is recomputed (with
  fewer, the peak is at the start of backward and the recomputation comes after the later
  blocks' activations are freed). The price is one more forward pass of each such block, but
  for a pre-norm block's last matmul (a fifth to a quarter more of its matmul FLOPs; a third in a
  post-norm block), not in MFU.
The largest micro-batch is what fits in 90% of the GPU's nominal memory (taken as GiB) after
the static part; the 10% covers the CUDA context, cuBLAS workspaces and fragmentation. These
are estimates for planning: a measured run (`--gpu auto` on the GPU) reports the real peak. The
activation formula and the weight copies are checked against what autograd saves in small
models of the gpt2 and llama kinds with the Triton ops (tests/test_mfu.py: within 2%); the
allocator's own overheads, transients and workspaces are not in them.
"""
import dataclasses
import functools
import heapq
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench.flops import block_matmuls, block_param_count, flops_per_token, param_count
from bench.hardware import GPU
from gpt.config import OPTIMIZERS, optimizer_dtype
from gpt.data import load_meta, prepare
from gpt.model import GPT, PRESETS, GPTConfig, preset, recompute_count
from kernels.cross_entropy import CHUNK_BYTES

# gigaGPT's (Cerebras, github.com/Cerebras/gigaGPT, configs/*.yaml) GPT-2-architecture shapes,
# for planning only: too large to build here. The vocabulary is padded to 50304 as in gpt2.
PLANNING_PRESETS: dict[str, dict] = {
    "giga-13b": dict(n_layer=40, n_head=40, n_embd=5120, block_size=2048),
    "giga-70b": dict(n_layer=80, n_head=64, n_embd=8192, block_size=2048),
    "giga-175b": dict(n_layer=96, n_head=96, n_embd=12288, block_size=2048),
}
DEFAULT_PLAN = ("gpt2", "llama", "gpt2-xl", "giga-13b", "giga-70b", "giga-175b")
SHARDINGS = ("ddp", "zero1", "fsdp")
MFUS = (0.30, 0.45, 0.60)
# Of the datasheet's memory taken as GiB. Drivers report 93-99.5% of that figure (H100 80 GB:
# 79.6 GiB; H200 141 GB: 140.4; B300 288 GB: about 269), so 90% stays inside each of them.
USABLE = 0.9
# (weights, grads, optimizer states) bytes per parameter.
STATE_BYTES = {"adamw": (4, 4, 8), "bf16_adamw": (2, 2, 4)}
KAHAN_BYTES = 2  # bf16_adamw's compensation with kahan_summation
UNFUSED_LOSS_BYTES = 12  # per class and token: torch's linear_cross_entropy at its backward (docstring)
GiB = 2**30


def training_file(path: str) -> tuple[GPTConfig, dict, str]:
    """(the model, the settings a bench run takes from it, where its vocabulary comes from) of a
    train.py config file: the model it trains from scratch, its vocabulary the dataset's, which
    is prepared first as train.py does where it is built offline (a character dataset's
    meta.pkl), else GPT-2's padded 50304 tokens. The settings are its batch_size, optimizer,
    recompute and dtype; the dtype None where train.py's is the machine's that runs it."""
    import train  # the repository's own; it imports this module, so not at the top

    c = train.parse_config([path])
    if c["init_from"] != "scratch":
        weights = "" if c["init_from"] == "resume" else " (GPT-2's weights: --preset gpt2, gpt2-medium, ...)"
        raise ValueError(f"{path} starts from init_from={c['init_from']}: a config file gives the model it trains "
                         f"from scratch{weights}")
    try:
        folder = prepare(c["dataset"], c["data_dir"])
    except ValueError as e:  # neither built nor buildable here (openwebtext's is GPT-2's BPE)
        folder, unprepared = Path(c["data_dir"]) / c["dataset"], f" ({e})"
    else:
        unprepared = ""
    meta = load_meta(folder)
    config = train.scratch_model(c, meta)
    source = f"{folder / 'meta.pkl'}" if meta else f"GPT-2's, padded{unprepared}"
    settings = {"batch_size": c["batch_size"], "optimizer": c["optimizer"], "recompute": c["recompute"],
                "dtype": optimizer_dtype(c["optimizer"], c["dtype"])}
    return config, settings, f"{path}: the model it trains, its {config.vocab_size}-token vocabulary {source}"


def record_name(name: str) -> str:
    """The name a result keeps for the model `name`: a config file's path normalized, so that
    ./config/x.py and config/x.py are one model."""
    return os.path.normpath(name) if name.endswith(".py") else name


def model(name: str) -> tuple[GPTConfig, dict, str | None]:
    """(the model, the settings a bench run takes from it, where its vocabulary comes from) of
    `name`: a train.py config file's (training_file), or a preset's (config_for: no settings, and
    its own vocabulary)."""
    return training_file(name) if name.endswith(".py") else (config_for(name), {}, None)


def config_for(name: str) -> GPTConfig:
    """A model preset (gpt.model.PRESETS) or a planning preset (PLANNING_PRESETS: gigaGPT's
    shapes). A train.py config file's model is training_file's."""
    if name in PLANNING_PRESETS:
        return GPTConfig(**PLANNING_PRESETS[name])
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {list(PRESETS) + list(PLANNING_PRESETS)}, or a "
                         f"train.py config file (name.py)")
    return GPTConfig(**preset(name))


def static_bytes(config: GPTConfig, optimizer: str, sharding: str, world_size: int, kahan: bool = False) -> int:
    """Weights, grads and optimizer states on one GPU (plus FSDP's gathered weights and its
    reduce-scatter's buffers)."""
    P = param_count(config)
    weight_bytes, grad_bytes, state_bytes = STATE_BYTES[optimizer]
    state_bytes += KAHAN_BYTES * kahan
    if sharding == "ddp":
        return (weight_bytes + grad_bytes + state_bytes) * P
    if sharding == "zero1":
        return (weight_bytes + grad_bytes) * P + state_bytes * zero1_share(config, world_size)
    if sharding == "fsdp":
        block = block_param_count(config)
        root = P - config.n_layer * block
        reduce = block * (2 + grad_bytes)  # a block's bf16 grads and the reduce-scatter input, both whole
        return (weight_bytes + grad_bytes + state_bytes) * P // world_size + 2 * (2 * block + root) + reduce
    raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")


def zero1_share(config: GPTConfig, world_size: int) -> int:
    """Parameters whose optimizer states ZeRO-1's fullest rank keeps: ZeroRedundancyOptimizer's
    _partition_parameters over the model's parameter groups, as train.py passes them."""
    return _zero1_share(tuple(dataclasses.asdict(config).items()), world_size)


@functools.cache  # blocks_to_recompute asks for the same share once per candidate block count
def _zero1_share(config_items: tuple, world_size: int) -> int:
    with torch.device("meta"):  # the real shapes, no memory
        groups = GPT(GPTConfig(**dict(config_items))).param_groups(0.0)
    # Each parameter to the emptiest rank, the lowest-numbered of equals; a heap of (size, rank)
    # finds it in log(world_size) steps (a list's min took minutes at --world-size 1000000).
    sizes = [(0, rank) for rank in range(world_size)]  # sorted: a heap already
    for group in groups:
        for numel in sorted((p.numel() for p in group["params"]), reverse=True):
            size, rank = sizes[0]
            heapq.heapreplace(sizes, (size + numel, rank))
    return max(size for size, _ in sizes)


def cast_copy_bytes(config: GPTConfig, optimizer: str, sharding: str) -> int:
    """The bf16 copies of fp32 matmul weights that autocast makes in the forward and autograd keeps
    for backward (adamw only; FSDP gathers the weights in bf16 already), the layers' only: the lm
    head's copy lives in linear_cross_entropy's forward alone. Biases are cast too, but their
    gradient does not need them: nothing keeps those copies."""
    if optimizer != "adamw" or sharding == "fsdp":
        return 0
    return 2 * sum(m.weights for m in block_matmuls(config))


def loss_bytes(config: GPTConfig) -> int:
    """What the triton linear_cross_entropy holds whatever the micro-batch: the lm head's fp32
    weight gradient, kept for the backward, and in its forward a chunk's share of that gradient
    and at most one chunk of logits."""
    return 2 * 4 * config.vocab_size * config.n_embd + CHUNK_BYTES


def held_bytes(config: GPTConfig, optimizer: str, sharding: str, world_size: int, kahan: bool = False,
               fused_loss: bool = True) -> int:
    """What one GPU holds whatever the micro-batch: static_bytes, autocast's weight copies and
    the fused loss's gradient buffers."""
    return (static_bytes(config, optimizer, sharding, world_size, kahan) + cast_copy_bytes(config, optimizer, sharding)
            + (loss_bytes(config) if fused_loss else 0))


def activation_bytes_per_token(config: GPTConfig, optimizer: str, recompute: bool | int = False,
                               sharding: str = "ddp", fused_loss: bool = True) -> int:
    """Bytes saved for the backward per token of a micro-batch (the formula in the docstring),
    `recompute` as train.py's."""
    h = config.n_embd
    r = 4 if optimizer == "adamw" and sharding != "fsdp" else 2  # the residual stream's bytes
    qkv = (config.n_head + 2 * config.n_kv_head) * config.head_dim
    up = 2 * config.mlp_hidden if config.mlp == "swiglu" else config.mlp_hidden
    layer = 2 * (3 * h + qkv + up + config.mlp_hidden) + 2 * r * h
    head = r * h + (4 * h if fused_loss else UNFUSED_LOSS_BYTES * config.vocab_size)
    L, n = config.n_layer, recompute_count(recompute, config.n_layer)
    inputs = n * r * h + max(n - 1, 0) * 2 * h  # the stream, and but into the first block the branch
    return (L - n) * layer + inputs + (layer if n == L else 0) + head


def peak_bytes(config: GPTConfig, optimizer: str, batch_size: int, seq_len: int, recompute: bool | int = False,
               sharding: str = "ddp", world_size: int = 1, kahan: bool = False, fused_loss: bool = True) -> int:
    """One GPU's planned peak for micro-batches of `batch_size` sequences of `seq_len` tokens."""
    return (held_bytes(config, optimizer, sharding, world_size, kahan, fused_loss)
            + activation_bytes_per_token(config, optimizer, recompute, sharding, fused_loss) * int(batch_size)
            * int(seq_len))  # Python ints: numpy's int32 would overflow


def max_micro_batch(memory_bytes: float, config: GPTConfig, optimizer: str, sharding: str, world_size: int,
                    seq_len: int, recompute: bool | int = False, fused_loss: bool = True) -> int:
    """Sequences of `seq_len` tokens per micro-batch that fit in USABLE of a GPU's `memory_bytes`
    (0: not even one)."""
    free = USABLE * memory_bytes - held_bytes(config, optimizer, sharding, world_size, fused_loss=fused_loss)
    per_sequence = activation_bytes_per_token(config, optimizer, recompute, sharding, fused_loss) * seq_len
    return max(0, int(free // per_sequence))


def blocks_to_recompute(memory_bytes: float, config: GPTConfig, optimizer: str, sharding: str, world_size: int,
                        seq_len: int, micro_batch: int, kahan: bool = False, fused_loss: bool = True) -> int | None:
    """The fewest blocks to recompute for `micro_batch` sequences to fit in USABLE of a GPU's
    `memory_bytes` (None: not even recomputing all)."""
    return next((n for n in range(config.n_layer + 1)
                 if peak_bytes(config, optimizer, micro_batch, seq_len, n, sharding, world_size, kahan, fused_loss)
                 <= USABLE * memory_bytes), None)


@dataclass(frozen=True)
class Plan:
    gpu: GPU
    dtype: str
    peak_tflops: float
    world_size: int
    seq_len: int | None  # None: each preset's block_size
    micro_batch: int = 16  # sequences, for the blocks it takes recomputing
    peak_given: bool = False  # peak_tflops is the user's (--peak-tflops), not the datasheet's


def tokens_per_s(peak_tflops: float, flops_per_token: int, mfu: float) -> float:
    return mfu * peak_tflops * 1e12 / flops_per_token


def print_plan(plan: Plan, models: dict[str, GPTConfig], console: Console | None = None) -> None:
    console = console or Console()
    gpu, N = plan.gpu, plan.world_size
    shardings = SHARDINGS if N > 1 else ("ddp",)
    given = " (your --peak-tflops)" if plan.peak_given else ""
    console.print(f"[bold]Plan for {gpu.name}[/bold]: dense {plan.dtype} {plan.peak_tflops:g} TFLOPS{given}, "
                  f"{gpu.memory_gb:g} GiB, {gpu.bandwidth_tbs:g} TB/s ({gpu.source}); {N} GPU(s). "
                  f"Estimates, not measurements: no {gpu.name} here.")
    speed = Table(title=f"Throughput per GPU at {', '.join(f'{m:.0%}' for m in MFUS)} MFU "
                        f"(PaLM FLOPs) and hours per billion tokens on {N} GPU(s)")
    for col in ("preset", "params", "seq", "GFLOPs/token", *(f"tok/s @{m:.0%}" for m in MFUS),
                *(f"h/1B tok @{m:.0%}" for m in (MFUS[0], MFUS[-1]))):
        speed.add_column(col, justify="left" if col == "preset" else "right")
    memory = Table(title=f"Memory per GPU on {N} GPU(s) and the largest micro-batch in "
                         f"{USABLE:.0%} of {gpu.memory_gb:g} GiB")
    for col in ("preset", "optimizer", "sharding", "static GiB", "act MiB/token",
                "max micro-batch (seqs)", "recomputing all", f"recompute for {plan.micro_batch}"):
        memory.add_column(col, justify="left" if col in ("preset", "optimizer", "sharding") else "right")
    unfit = []
    for name, config in models.items():
        T = plan.seq_len or config.block_size
        flops = flops_per_token(config, T).palm
        rates = [tokens_per_s(plan.peak_tflops, flops, m) for m in MFUS]
        setups = [(optimizer, sharding) for optimizer in OPTIMIZERS for sharding in shardings]
        fits = {setup: [max_micro_batch(gpu.memory_gb * GiB, config, *setup, N, T, recompute)
                        for recompute in (False, True)] for setup in setups}
        runs = any(fit[1] for fit in fits.values())  # a sequence fits somehow, every block recomputed
        figures = [*(f"{r:,.0f}" for r in rates), *(f"{1e9 / (r * N) / 3600:,.3g}" for r in (rates[0], rates[-1]))]
        if not runs:
            unfit.append(name)
        speed.add_row(name, f"{param_count(config) / 1e9:.3g}B", str(T), f"{flops / 1e9:.3g}",
                      *(figures if runs else ["does not fit"] * len(figures)))
        for optimizer, sharding in setups:
            blocks = blocks_to_recompute(gpu.memory_gb * GiB, config, optimizer, sharding, N, T, plan.micro_batch)
            memory.add_row(name, optimizer, sharding if N > 1 else "single GPU",
                           f"{held_bytes(config, optimizer, sharding, N) / GiB:,.1f}",
                           f"{activation_bytes_per_token(config, optimizer, sharding=sharding) / 2**20:.2f}",
                           *(str(n) if n else "does not fit" for n in fits[optimizer, sharding]),
                           "does not fit" if blocks is None
                           else f"{blocks} of {config.n_layer} blocks" if blocks else "none")
    console.print(speed)
    console.print(memory)
    if unfit:
        console.print(f"Throughput of {', '.join(unfit)}: does not fit, not one sequence with any optimizer and "
                      "sharding, even recomputing every block.")
    console.print("Activations: per layer 2*(3h + qkv + up + hidden) bytes in bf16 (with RoPE the turned "
                  "q, k and a copy of v in the projection output's place) plus the two "
                  "norm inputs (fp32 under autocast outside FSDP), head r*h + 4h (the triton linear_cross_entropy; "
                  f"torch's: r*h + {UNFUSED_LOSS_BYTES}*vocab); a recomputed block keeps its "
                  "inputs (stream and pending branch), and recomputing all holds one block's activations "
                  f"too; 'recompute for {plan.micro_batch}': the fewest blocks (train.py's recompute=n, the "
                  "first n) for that micro-batch (--batch-size) to fit. "
                  "Static: weights, grads and optimizer states, adamw 16 B/param, bf16_adamw 8 B/param "
                  "(ZeRO-1 shards optimizer states by whole parameters: its fullest rank's; FSDP all three plus "
                  "two gathered bf16 blocks, the root's embeddings and a block's whole grads and reduce-scatter "
                  "input), and "
                  "under adamw's autocast outside FSDP 2 B per layer matmul weight for its bf16 copies; "
                  "the loss's 8*vocab*h + 1 GiB. "
                  "See bench/plan.py.")
