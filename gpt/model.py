"""A GPT in one file, built from the kernel registry's ops.

GPT-2 and LLaMA-style models are one class with switches: normalization (layernorm | rmsnorm),
its position (pre | post), position encoding (learned | rope | none), MLP (gelu | swiglu, and the
plain MLP's activation), bias, weight tying and grouped-query heads. The hot ops (norms, SwiGLU,
RoPE, attention, the loss) come from `kernels`, one backend per op, chosen before the model is built.
"""
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
from kernels.runtime import matmul_dtype

from .config import ConfigError


def count(what: str, value, alternative: str = "", minimum: int | None = None) -> int:
    """`value` as a Python int: an integral number (numpy's too), not a bool nor a float, which
    would fail deep inside (a layer count, a tensor size); at least `minimum` if given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an int{alternative}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value}")
    return int(value)


def check_sampling(program: str, temperature, top_k, max_new_tokens) -> None:
    """Sampling's settings: temperature finite and >= 0 (0 takes the likeliest token; below 0
    would sample the least likely, inf any token alike), top_k None (all) or at least 1,
    max_new_tokens an int >= 0."""
    count(f"{program}: max_new_tokens", max_new_tokens, minimum=0)
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0
            or not math.isfinite(temperature)):
        raise ValueError(f"{program}: temperature must be finite and >= 0 (0: the likeliest token), "
                         f"got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"{program}: top_k must be at least 1, or None for the whole vocabulary; got {top_k!r}")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (plain multi-head)
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and norms
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre | post
    norm_eps: float = 1e-5
    pos_encoding: str = "learned"  # learned | rope | none
    rope_theta: float = 10000.0
    mlp: str = "gelu"  # gelu (a plain MLP, its activation below) | swiglu
    activation: str = "gelu"  # gelu | gelu_tanh (GPT-2's own) | silu | relu, for the plain MLP
    # None: 4·n_embd (plain), 8/3·n_embd rounded up to 64 (swiglu; LLaMA rounds up to 256, so give
    # its widths where they differ: 11008 for LLaMA-7B's 4096, where this rule gives 10944)
    mlp_hidden: int | None = None
    tie_weights: bool = True  # lm_head shares the token embedding

    def __post_init__(self):
        choices = {"norm": ("layernorm", "rmsnorm"), "norm_position": ("pre", "post"),
                   "pos_encoding": ("learned", "rope", "none"), "mlp": ("gelu", "swiglu"),
                   "activation": ("gelu", "gelu_tanh", "silu", "relu")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"GPTConfig: {key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head", "mlp_hidden"):
            optional = key in ("n_kv_head", "mlp_hidden")  # None picks a default; anything else is a count
            if not (optional and getattr(self, key) is None):
                setattr(self, key, count(f"GPTConfig: {key}", getattr(self, key), " or None" if optional else ""))
        for key in ("block_size", "vocab_size", "n_layer", "n_embd", "mlp_hidden"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"GPTConfig: {key} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise ValueError(f"GPTConfig: norm_eps and rope_theta must be above 0, got {self.norm_eps} and "
                             f"{self.rope_theta}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not 1 <= self.n_kv_head <= self.n_head:
            raise ValueError(f"GPTConfig: n_head must be at least 1 and n_kv_head from 1 to n_head, got n_head "
                             f"{self.n_head} and n_kv_head {self.n_kv_head}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("GPTConfig: rope needs an even head size")
        if self.mlp == "swiglu" and self.activation not in ("gelu", "silu"):  # gelu: the default, unused
            raise ValueError(f"GPTConfig: mlp='swiglu' gates with silu; activation {self.activation!r} is the "
                             f"plain MLP's (mlp='gelu')")
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd if self.mlp == "gelu" else _round_up(8 * self.n_embd // 3, 64)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


# The architecture: what a checkpoint or preset sets. Dropout is training's choice (a resumed or
# fine-tuned run takes the config's, as nanoGPT's does); the vocabulary is the data's.
ARCH_KEYS = [f.name for f in fields(GPTConfig) if f.name not in ("vocab_size", "dropout")]

# Architectures by name. `llama` is LLaMA's recipe at GPT-2 small's width and depth: its blocks,
# with an 8/3·n_embd SwiGLU, hold gpt2's 85M parameters; its untied head makes 124M beside the
# token embedding (162M in all).
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "llama": dict(n_layer=12, n_head=12, n_embd=768, norm="rmsnorm", pos_encoding="rope",
                  mlp="swiglu", bias=False, tie_weights=False),
    "shakespeare-char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
                             vocab_size=65, bias=False),
}


def preset(name: str) -> dict:
    """Every GPTConfig field for the architecture `name`: its own values over the field defaults."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {list(PRESETS)}")
    return {f.name: f.default for f in fields(GPTConfig)} | PRESETS[name]


def preset_architecture(key: str, value) -> dict:
    """What a config's assignment sets with it (gpt.config.parse_args' `implied`): a preset, every
    architecture key where it stands, for the lines after it to see (in a training config that
    train.py reads, and gpt.sample too)."""
    if key != "preset" or not value:
        return {}
    try:
        return {k: v for k, v in preset(value).items() if k in ARCH_KEYS}
    except ValueError as e:
        raise ConfigError(str(e)) from None


def model_ops(config: GPTConfig, generation: bool = False) -> set[str]:
    """The registry ops a model of `config` calls in training as train.py runs it (forward with
    the loss, linear_cross_entropy: no logits returned; backward), or in generation (forward, no
    loss; RoPE, attention's in training, is the rope op's for the keys a KV cache keeps).
    cross_entropy is the loss of a forward that returns its logits, which neither runs."""
    used = {"rms_norm" if config.norm == "rmsnorm" else "layer_norm", "attention"}
    if config.mlp == "swiglu":
        used.add("swiglu")
    if not generation:
        used.add("linear_cross_entropy")
    elif config.pos_encoding == "rope":
        used.add("rope")
    return used


class Ops:
    """The registry functions this model calls, one backend per op (default: all torch)."""

    def __init__(self, backends: Mapping[str, str] | None = None):
        backends = dict(backends or {})
        self.backends = {op: backends.pop(op, "torch") for op in kernels.OPS}
        if backends:
            raise ValueError(f"unknown ops {sorted(backends)}; ops are {list(kernels.OPS)}")
        for op, backend in self.backends.items():
            setattr(self, op, kernels.get(op, backend))


class Norm(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops):
        super().__init__()
        self.rms = config.norm == "rmsnorm"
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if config.bias and not self.rms else None
        self.dropout = config.dropout  # of the branches added to the residual stream
        self.ops = ops

    def forward(self, x, residual=None, out_dtype=None):
        """norm(x); given the residual stream, x is a branch's output (attention's or the MLP's):
        (norm(s), s) with s = residual + dropout(x) from one op, the dropout nanoGPT applies to
        each branch output (resid_dropout) in training."""
        p = self.dropout if residual is not None and self.training else 0.0
        if self.rms:
            return self.ops.rms_norm(x, self.weight, self.eps, residual=residual, out_dtype=out_dtype, dropout_p=p)
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual, out_dtype=out_dtype,
                                   dropout_p=p)


def add_and_norm(norm: Norm, stream, branch, out_dtype):
    """(norm(stream + branch), stream + branch): a pre-norm block's residual add, fused into the
    norm that reads its result. branch None: nothing is pending (the first block's input)."""
    if branch is None:
        return norm(stream, out_dtype=out_dtype), stream
    return norm(branch, residual=stream, out_dtype=out_dtype)


def rope_tables(head_dim: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (length, head_dim/2) fp32, of the rotary angles pos·theta^(-2i/head_dim).
    Computed in float64 on the CPU (not every device has float64) and rounded once: angles formed in
    fp32 are off by up to half an ulp of pos·freq, 1e-3 of a radian by position 16k."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64, device="cpu"), inv_freq)
    return angles.cos().to(device, torch.float32), angles.sin().to(device, torch.float32)


class KVCache:
    """Every layer's keys and values of the tokens generated from so far, so that each new token
    costs one position's forward instead of the whole context's. Holds up to block_size positions;
    `length` of them are filled."""

    def __init__(self, config: GPTConfig, batch_size: int):
        self.shape = (batch_size, config.n_kv_head, config.block_size, config.head_dim)  # (B, nkv, S, hs)
        self.keys: list[torch.Tensor | None] = [None] * config.n_layer
        self.values: list[torch.Tensor | None] = [None] * config.n_layer
        self.length = 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer`'s k and v (B, nkv, T, hs) after the filled positions; return all of
        its keys and values so far. `length` moves on once every layer has stored (GPT.forward)."""
        if self.keys[layer] is None:  # in the dtype the model computes k and v in (autocast's)
            self.keys[layer] = k.new_empty(self.shape)
            self.values[layer] = v.new_empty(self.shape)
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops, layer: int = 0):
        super().__init__()
        self.layer = layer  # its slot in a KVCache
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_width = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_width, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled = True
        self.dropout = config.dropout  # of the attention weights; the output's is the next norm's
        self.ops = ops

    def forward(self, x, rope=None, cache: KVCache | None = None):
        B, T, C = x.size()
        q_width, kv_width = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        # kernels.split: the Triton attention backward writes dq, dk, dv side by side, as one d_qkv
        q, k, v = kernels.split(self.c_attn(x), [q_width, kv_width, kv_width], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        p = self.dropout if self.training else 0.0
        if cache is None:  # training, or inference without a cache: rope's turn of q and k is attention's
            y = self.ops.attention(q, k, v, causal=True, dropout_p=p, rope=rope)
        else:  # the cache keeps turned keys
            if rope is not None:
                q, k = self.ops.rope(q, *rope), self.ops.rope(k, *rope)  # pairs (hs/2 apart) turned
            if cache.length:
                y = self._attend_cached(q, *cache.extend(self.layer, k, v), start=cache.length, dropout_p=p)
            else:  # the prompt: causal attention over itself, as in training
                cache.extend(self.layer, k, v)
                y = self.ops.attention(q, k, v, causal=True, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)

    def _attend_cached(self, q, k, v, start: int, dropout_p: float):
        """q (B, nh, T, hs) of positions start.. over the cache's k, v (B, nkv, start + T, hs):
        query i sees keys up to start + i. Generation's one-token steps (T = 1) see them all; the
        registry's attention op takes only equal lengths, so this is torch's SDPA. dropout_p: a
        model generating in training mode drops attention weights here as without the cache."""
        T, L = q.size(2), k.size(2)
        mask = None if T == 1 else torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              enable_gqa=self.n_head != self.n_kv_head)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        # SwiGLU's gate and up projections are one matmul; the op reads the two halves.
        fc_width = 2 * config.mlp_hidden if self.swiglu else config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, fc_width, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled = True
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(),
                    "relu": nn.ReLU()}[config.activation]
        self.ops = ops

    def forward(self, x):
        """The branch output, before dropout (the norm that adds it to the stream drops it out)."""
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = kernels.split(h, [h.size(-1) // 2] * 2, dim=-1)  # d_gate, d_up join as one d_h
            h = self.ops.swiglu(gate, up)
        else:
            h = self.act(h)
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops, layer: int = 0):
        super().__init__()
        self.recompute = False  # activation checkpointing: see GPT.recompute_blocks
        self.pre_norm = config.norm_position == "pre"
        self.ln_1 = Norm(config, ops)
        self.attn = CausalSelfAttention(config, ops, layer)
        self.ln_2 = Norm(config, ops)
        self.mlp = MLP(config, ops)

    def forward(self, x, branch=None, rope=None, cache=None):
        """(residual stream, branch output not yet added to it) in and out. Pre-norm adds each
        branch inside the next norm (nanoGPT's x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)), the
        last add left to whoever comes next); post-norm's stream is the norms' output."""
        if self.recompute and torch.is_grad_enabled():
            # Inside the module call, so FSDP2's hooks gather the weights around the recomputation too.
            return checkpoint(self._forward, x, branch, rope, cache, use_reentrant=False)
        return self._forward(x, branch, rope, cache)

    def _forward(self, x, branch, rope, cache):
        if self.pre_norm:
            dtype = matmul_dtype(x)  # the norms write outputs that feed only matmuls in autocast's dtype at once
            h, x = add_and_norm(self.ln_1, x, branch, dtype)
            h, x = add_and_norm(self.ln_2, x, self.attn(h, rope, cache), dtype)
            return x, self.mlp(h)
        x, _ = self.ln_1(self.attn(x, rope, cache), residual=x)  # ln_1(x + attn(x))
        x, _ = self.ln_2(self.mlp(x), residual=x)
        return x, None


def recompute_count(blocks: bool | int, n_layer: int) -> int:
    """How many blocks `recompute` (train.py's key: True, False or a number) recomputes."""
    if blocks is True or blocks is False:
        return n_layer if blocks else 0
    if not isinstance(blocks, int) or not 0 <= blocks <= n_layer:
        raise ValueError(f"recompute: True, False or a number of blocks from 0 to {n_layer}, got {blocks!r}")
    return blocks


# Functions of the module's, not lambdas: a model with its hooks pickles.
def _note_tie_before_load(model: "GPT", state_dict, prefix, *_) -> None:
    model._tied_before_load = model._tied()
    # A tied model keeps one of two different matrices, whichever loads last: an untied model's
    # checkpoint (or a head fine-tuned apart) would lose its head or its embedding without a word.
    # Refused here, before anything is copied (torch raises error_msgs' only after the whole load).
    embedding, head = state_dict.get(prefix + "wte.weight"), state_dict.get(prefix + "lm_head.weight")
    if (model._tied_before_load and isinstance(embedding, torch.Tensor) and isinstance(head, torch.Tensor)
            and "meta" not in (embedding.device.type, head.device.type) and not _same_values(head, embedding)):
        raise RuntimeError(f"{type(model).__name__}.load_state_dict: lm_head.weight differs from wte.weight, and "
                           f"this model ties them (tie_weights=True): build it with tie_weights=False to load both")


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values, NaNs in the same places (a diverged run's own checkpoint); ops that
    FSDP2's DTensors have too (allclose they have not)."""
    if a is b:
        return True
    b = b.to(a.device)
    return (a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def _tie_after_load(model: "GPT", incompatible_keys) -> None:
    model._keep_tie(getattr(model, "_tied_before_load", False))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, kernels: Mapping[str, str] | None = None):
        """`kernels`: op -> backend (ops left out use torch); see `kernels.choose`."""
        super().__init__()
        self.config = config
        self.ops = Ops(kernels)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_encoding == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, self.ops, layer) for layer in range(config.n_layer))
        # Post-norm blocks end in a norm already; pre-norm needs one before the head.
        self.ln_f = Norm(config, self.ops) if config.norm_position == "pre" else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.register_load_state_dict_pre_hook(_note_tie_before_load)
        self.register_load_state_dict_post_hook(_tie_after_load)
        self.apply(self._init_weights)
        # RoPE's cos and sin tables (block_size, head_dim/2), made once: made in forward, torch.compile
        # fuses them into the rotation and takes pow, cos and sin again for every element of q and k
        # (about 10 ms of the LLaMA preset's 43 ms compiled step on an H200). Buffers, so they move with the
        # model; not saved; kept fp32 whatever the model's dtype (_apply), so bf16 models turn exactly.
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        if config.pos_encoding == "rope":
            self._make_rope_tables(self.wte.weight.device)

    def _tied(self) -> bool:
        """Whether lm_head's own weight Parameter is the token embedding's (a parametrized or
        replaced head has none of its own)."""
        return dict(self.lm_head.named_parameters(recurse=False)).get("weight") is self.wte.weight

    def _keep_tie(self, was_tied: bool) -> None:
        """lm_head tied to the token embedding again where it was before a move or a load:
        to_empty, a move to or from meta and load_state_dict(assign=True) give each module a
        Parameter of its own, untying them without a word. A head untied or replaced on purpose
        stays as it is."""
        if was_tied and not self._tied():
            self.lm_head.weight = self.wte.weight

    def _init_weights(self, module):
        # GPT-2's init: N(0, 0.02), and residual projections scaled by 1/sqrt(2·n_layer).
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual_scaled", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def recompute_blocks(self, blocks: bool | int = True) -> None:
        """Activation checkpointing of the first `blocks` blocks (True: all, False: none). A
        recomputed block keeps only its inputs (the residual stream and the branch still to be
        added) for backward, and runs its forward again there (but for its last matmul, whose
        output backward does not need, in a pre-norm block): a fifth to a quarter more of its
        matmul FLOPs (a third in a post-norm block; not counted in MFU), the same numbers
        (dropout's random state is replayed). The first blocks, because backward reaches them
        last: by then the later blocks' activations are freed, so recomputing one adds nothing to
        the step's peak, which is at the start of backward unless every block is recomputed."""
        n = recompute_count(blocks, len(self.h))
        for i, block in enumerate(self.h):
            block.recompute = i < n

    @property
    def recomputed(self) -> int:
        """How many blocks are recomputed in backward (recompute_blocks)."""
        return sum(block.recompute for block in self.h)

    @classmethod
    def from_pretrained(cls, model_type: str, override_args: dict | None = None) -> "GPT":
        """nanoGPT's: a GPT holding `model_type`'s weights (gpt2, gpt2-medium, gpt2-large,
        gpt2-xl from Hugging Face's hub, or a local folder holding a Hugging Face GPT-2's
        config.json and model.safetensors, as train.py's init_from takes them: gpt.pretrained.load),
        fp32 on the CPU. override_args may set dropout, as there."""
        from gpt import pretrained

        override_args = override_args or {}
        if set(override_args) - {"dropout"}:
            raise ValueError(f"GPT.from_pretrained: only dropout can be overridden, got {sorted(override_args)}")
        return pretrained.load(model_type, dropout=override_args.get("dropout", 0.0))

    def _make_rope_tables(self, device: torch.device) -> None:
        c = self.config
        self.rope_cos, self.rope_sin = rope_tables(c.head_dim, c.block_size, c.rope_theta, device)

    def _apply(self, fn, recurse=True):
        """Module.to, .cuda, .bfloat16, .to_empty ...: the rope tables are made again where they went,
        in fp32 (to_empty leaves them uninitialized, a cast would round them), and a tied head is
        tied again (_keep_tie)."""
        tied = self._tied()
        super()._apply(fn, recurse)
        self._keep_tie(tied)
        if self.rope_cos is not None:
            self._make_rope_tables(self.rope_cos.device)
        return self

    def crop_block_size(self, block_size: int) -> None:
        """nanoGPT's: a shorter context than the model was built with (GPT-2's 1024 positions
        fine-tuned at 256), keeping the first `block_size` learned positions."""
        block_size = count("GPT.crop_block_size: block_size", block_size)
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"GPT.crop_block_size: block_size must be in [1, {self.config.block_size}], "
                             f"got {block_size}")
        self.config = replace(self.config, block_size=block_size)  # not the caller's, which others may share
        if self.wpe is not None:
            self.wpe.weight = nn.Parameter(self.wpe.weight[:block_size].detach().clone())
        if self.rope_cos is not None:
            self._make_rope_tables(self.rope_cos.device)

    def num_params(self, non_embedding: bool = False) -> int:
        """Exact parameter count (shared tensors once). Non-embedding leaves out the token and
        position embeddings, and the lm_head only when it is tied to them."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, cache: KVCache | None = None, return_logits: bool = True):
        """idx (B, T) token ids -> (logits, loss): with targets, every position's logits and the
        mean loss; without, the last position's logits. Given a cache, idx continues the tokens
        it holds (inference only): their keys and values are read from it and idx's added.
        return_logits=False, with targets: (None, loss), as training wants it: the lm head and the
        loss are then one op (linear_cross_entropy), whose triton backend keeps no logits."""
        B, T = idx.size()
        if B == 0 or T == 0:  # no logits to return, and a mean loss over no tokens would be NaN
            raise ValueError(f"GPT: idx must hold at least one sequence of at least one token, got shape {(B, T)}")
        # Plain CPU tensors only: on a GPU the check would wait for it, and a fake tensor (tracing,
        # FLOP counting) has no values.
        if type(idx) is torch.Tensor and idx.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = (int(v) for v in torch.aminmax(idx))
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"GPT: token ids must be in [0, {self.config.vocab_size}), got ids from {low} to "
                                 f"{high}")
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"GPT: sequence of length {start + T} is longer than block_size {self.config.block_size}")
        if cache is not None and targets is not None:
            raise ValueError("GPT: a KV cache is for inference; training takes whole sequences")
        x = self.wte(idx)  # (B, T, n_embd)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        rope = None if self.rope_cos is None else (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        branch = None
        for block in self.h:
            x, branch = block(x, branch, rope, cache)
        if cache is not None:
            cache.length += T
        if self.ln_f is not None:
            x, _ = add_and_norm(self.ln_f, x, branch, matmul_dtype(x))
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # inference: only the last position's logits
        if not return_logits and self._plain_head():
            return None, self.ops.linear_cross_entropy(x, self.lm_head.weight, targets)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = self.ops.cross_entropy(logits, targets)  # fp32 mean over targets != -1
        return logits if return_logits else None, loss

    def _plain_head(self) -> bool:
        """Whether lm_head is what linear_cross_entropy computes, x @ weight.T: a Linear (parametrized
        or not) without a bias, with no hooks of its own nor global ones (a profiler's, an activation
        logger's: torch.nn.modules.module.register_module_forward_hook). Anything else (a head
        wrapped by LoRA or peft, a hook) is called as a module: the fused loss would skip it."""
        head, hooks = self.lm_head, torch.nn.modules.module
        return (type(head).forward is nn.Linear.forward and head.bias is None
                and not (head._forward_hooks or head._forward_pre_hooks or head._backward_hooks
                         or head._backward_pre_hooks or hooks._global_forward_hooks
                         or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                         or hooks._global_backward_pre_hooks))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices (matmul weights, embeddings), none on vectors (norms, biases)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 kv_cache: bool = True, vocab_limit: int | None = None):
        """Extend idx (B, T) by max_new_tokens sampled tokens, each conditioned on the last
        block_size tokens before it. Temperature 0 takes the likeliest token; vocab_limit: only
        ids below it are drawn (a tokenizer's, where the model's vocabulary is padded past it).
        With kv_cache, the prompt's forward fills a KVCache and each new token then runs alone;
        past block_size the window slides, which moves every position, so from there each token
        runs the whole window again (as without the cache)."""
        check_sampling("GPT.generate", temperature, top_k, max_new_tokens)
        if vocab_limit is not None:
            vocab_limit = count("GPT.generate: vocab_limit", vocab_limit, minimum=1)
        cache = KVCache(self.config, idx.size(0)) if kv_cache and idx.size(1) < self.config.block_size else None
        for _ in range(int(max_new_tokens)):
            if cache is not None and idx.size(1) <= self.config.block_size:
                logits, _ = self(idx[:, cache.length:], cache=cache)
            else:
                logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :].float()
            if vocab_limit is not None:
                logits[:, vocab_limit:] = -float("inf")
            if temperature == 0:
                idx_next = logits.argmax(-1, keepdim=True)
            else:
                # Less the max first: a tiny temperature then takes the others to -inf, not to inf - inf;
                # in float64, where any positive float temperature is positive (in float32 1e-46 is 0: 0 / 0).
                logits = (logits - logits.amax(-1, keepdim=True)).double() / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
