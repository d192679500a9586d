"""Training FLOPs per token of a GPTConfig, counted from its layer shapes.

A matmul with weight (n_in, n_out) costs 2·n_in·n_out FLOPs per token forward and twice that
backward (gradients of input and weight): 6·n_in·n_out in training. Summed over every matmul
(the qkv projection at its grouped-query width, the attention output projection, the MLP's
projections, the lm head) that is 6 x the matmul weights. Attention's own matmuls (QKᵀ and PV)
cost 4·T·n_embd per token per layer forward, 12·L·H·Q·T in training (H heads of size Q, so
H·Q = n_embd, sequence length T).

Conventions:
- `palm`: 6N + 12·L·H·Q·T, the PaLM paper's (appendix B), nanoGPT's `estimate_mfu` and
  torchtitan's count, which charges attention for the full T x T score matrix though a causal
  model needs half. N is every parameter but the embedding tables, which are looked up, not
  multiplied: the matmul weights (a tied lm head once, through the token embedding) and the norm
  and bias vectors, which these counts charge 6 FLOPs each too though theirs is elementwise work
  (0.1% of GPT-2 124M's N). For GPT-2 124M that is nanoGPT's N exactly (all parameters minus the
  position embedding), for an untied RoPE model torchtitan's (all minus the token embedding). MFU is
  reported on this count, so it is comparable with nanoGPT's and torchtitan's. It charges more
  attention than flash attention runs (12 against 7·L·H·Q·T), so at long contexts MFU exceeds
  the fraction of peak the GPU computed: GPT-2's count is 1.06x the hardware count at T = 1024,
  1.42x at 16384.
- `causal`: 6N + 6·L·H·Q·T, the work causal attention needs; llm.c's MFU counts about this
  (6N + 6·L·C·T, its N every parameter, the embeddings' too: 803M FLOPs a token for GPT-2 124M
  at T = 1024 against 799M here, and 855M by `palm`).
- `hardware`: the matmuls the GPU executes: 6 x the matmul weights, causal attention plus the
  flash-attention backward's recomputation of QKᵀ (one more score matmul beside the four a
  backward needs: 7·L·H·Q·T, as FlashAttention-2's one-kernel backward runs them; the triton
  backward's two kernels, dK dV and dQ, each recompute QKᵀ and dO Vᵀ, 9·L·H·Q·T, which this
  count does not credit: its rows' hardware rate is of FlashAttention-2's work), plus the
  forward that activation checkpointing runs again in each recomputed block (2 FLOPs per matmul
  weight per token and causal attention's forward, 2·H·Q·T, per such block; but for a pre-norm
  block's last matmul, the MLP's c_proj, whose output no backward needs: torch's checkpoint
  stops recomputing once it has what backward saved, so that one is not run again; a post-norm
  block ends in a norm that needs it). Embedding lookups,
  norms, activations, softmax and the loss are elementwise work it leaves out (a fraction of a
  percent at these widths).
"""
from dataclasses import dataclass

from gpt.model import GPTConfig


@dataclass(frozen=True)
class Matmul:
    name: str
    n_in: int
    n_out: int
    count: int  # how many of them the model has (one per layer, or one)

    @property
    def weights(self) -> int:
        return self.n_in * self.n_out * self.count


def matmuls(config: GPTConfig) -> list[Matmul]:
    """Every weight matmul of the model, by its shape."""
    return [*block_matmuls(config), Matmul("lm_head", config.n_embd, config.vocab_size, 1)]


def block_matmuls(config: GPTConfig) -> list[Matmul]:
    """The blocks' weight matmuls, each counted n_layer times (by its count the lm head, counted
    once, could not be told from them in a one-layer model)."""
    C, L = config.n_embd, config.n_layer
    qkv = (config.n_head + 2 * config.n_kv_head) * config.head_dim
    fc = 2 * config.mlp_hidden if config.mlp == "swiglu" else config.mlp_hidden
    return [Matmul("attn.c_attn (q, k, v)", C, qkv, L),
            Matmul("attn.c_proj", C, C, L),
            Matmul("mlp.c_fc" + (" (gate, up)" if config.mlp == "swiglu" else ""), C, fc, L),
            Matmul("mlp.c_proj", config.mlp_hidden, C, L)]


def _norm_params(config: GPTConfig) -> int:
    return config.n_embd * (1 if config.norm == "rmsnorm" or not config.bias else 2)


def _block_vectors(config: GPTConfig) -> int:
    """One block's norm and bias parameters: its matmuls' biases and its two norms."""
    return config.bias * sum(m.n_out for m in block_matmuls(config)) + 2 * _norm_params(config)


def _final_norm(config: GPTConfig) -> int:
    return _norm_params(config) * (config.norm_position == "pre")


def vector_param_count(config: GPTConfig) -> int:
    """The norm and bias parameters of GPT(config): the blocks', and a pre-norm model's final norm."""
    return config.n_layer * _block_vectors(config) + _final_norm(config)


def block_param_count(config: GPTConfig) -> int:
    """Parameters of one transformer block: its matmul weights and biases, its two norms."""
    return sum(m.n_in * m.n_out for m in block_matmuls(config)) + _block_vectors(config)


def param_count(config: GPTConfig) -> int:
    """Parameters of GPT(config), counted from the config (so that planning needs no model):
    the blocks, then the final norm and the embeddings, a tied head once."""
    C = config.n_embd
    n = config.n_layer * block_param_count(config) + _final_norm(config)
    n += config.vocab_size * C * (1 if config.tie_weights else 2)
    if config.pos_encoding == "learned":
        n += config.block_size * C
    return n


@dataclass(frozen=True)
class Flops:
    """Training FLOPs per token (forward + backward) at one sequence length."""

    matmul: int  # 6 x every matmul's weights
    vectors: int  # 6 x the norm and bias parameters (the rest of 6N)
    attention_unit: int  # L·H·Q·T: attention's FLOPs are multiples of it
    recomputed_matmul: int = 0  # 2 x the recomputed blocks' matmul weights run again
    recomputed_attention_unit: int = 0  # the recomputed blocks' share of attention_unit

    @property
    def palm(self) -> int:
        return self.matmul + self.vectors + 12 * self.attention_unit

    @property
    def causal(self) -> int:
        return self.matmul + self.vectors + 6 * self.attention_unit

    @property
    def hardware_matmul(self) -> int:
        return self.matmul + self.recomputed_matmul

    @property
    def hardware(self) -> int:
        return self.hardware_matmul + 7 * self.attention_unit + 2 * self.recomputed_attention_unit


def flops_per_token(config: GPTConfig, seq_len: int | None = None, recomputed: int = 0) -> Flops:
    """`recomputed`: the blocks whose forward runs again in backward (GPT.recompute_blocks).
    Counts in Python ints: numpy's int32 would wrap past 2^31 (GPT-2 XL at 32k tokens)."""
    T, recomputed = int(seq_len or config.block_size), int(recomputed)
    matmul = 6 * sum(m.weights for m in matmuls(config))
    rerun = block_matmuls(config)[:-1 if config.norm_position == "pre" else None]  # (see the module's docstring)
    rerun_weights = sum(m.weights for m in rerun) // config.n_layer
    # H·Q is the query width n_embd: grouped-query attention shares k and v between heads but
    # every query head still scores every key.
    return Flops(matmul, 6 * vector_param_count(config), config.n_layer * config.n_embd * T,
                 2 * recomputed * rerun_weights, recomputed * config.n_embd * T)


def causal_attention_fwd_flops(B: int, H: int, T: int, D: int) -> float:
    """Causal attention's forward (QKᵀ and PV, the causal half) on B sequences of T tokens, H
    heads of size D; its useful backward is 2.5x (five matmuls to two, recomputing QKᵀ)."""
    return 4 * B * H * T * T * D / 2


CONVENTION = ("MFU counts 6N + 12*L*H*Q*T FLOPs a token, N the parameters but the embedding tables "
              "(PaLM / nanoGPT / torchtitan convention: non-causal attention); hardware FLOPs count "
              "the matmuls, causal attention and flash attention's recomputed QK^T (7*L*H*Q*T)")
