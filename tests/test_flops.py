import pytest
import torch

from bench.flops import (CONVENTION, Flops, causal_attention_fwd_flops, flops_per_token, matmuls, param_count,
                         vector_param_count)
from gpt.model import GPT, PRESETS, GPTConfig, preset

# GPT-2 124M (vocab padded to 50304), by hand: L=12 layers, C=768, T=1024.
GPT2_LAYER_WEIGHTS = 768 * 3 * 768 + 768 * 768 + 768 * 4 * 768 + 4 * 768 * 768  # qkv, proj, fc, proj
GPT2_MATMUL_WEIGHTS = 12 * GPT2_LAYER_WEIGHTS + 768 * 50304  # + lm head (tied: the wte matrix)
# Biases (qkv, proj, fc, proj) and two LayerNorms (weight and bias) a layer, and the final LayerNorm.
GPT2_VECTORS = 12 * (3 * 768 + 768 + 4 * 768 + 768 + 2 * 2 * 768) + 2 * 768
ATTENTION_UNIT = 12 * 768 * 1024  # L·H·Q·T with H·Q = 768


def model(config: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


def test_gpt2_by_hand():
    assert GPT2_LAYER_WEIGHTS == 7_077_888 and GPT2_MATMUL_WEIGHTS == 123_568_128 and GPT2_VECTORS == 121_344
    f = flops_per_token(GPTConfig(**preset("gpt2")))
    assert f.matmul == 6 * 123_568_128 == 741_408_768
    assert f.vectors == 6 * 121_344 == 728_064
    assert f.palm == 741_408_768 + 728_064 + 12 * ATTENTION_UNIT == 855_383_040
    assert f.causal == 741_408_768 + 728_064 + 6 * ATTENTION_UNIT == 798_759_936
    # The hardware count is the matmuls' alone: the vectors' work is elementwise.
    assert f.hardware == 741_408_768 + 7 * ATTENTION_UNIT == 807_469_056


def test_recomputed_blocks_count_in_hardware_flops_only():
    """Activation checkpointing runs each recomputed block's forward again, but for a pre-norm
    block's MLP output projection: 2 FLOPs per matmul weight per token and causal attention's
    forward (2·H·Q·T a layer), in the hardware count."""
    config = GPTConfig(**preset("gpt2"))
    plain, four = flops_per_token(config), flops_per_token(config, recomputed=4)
    rerun = GPT2_LAYER_WEIGHTS - 4 * 768 * 768
    assert (four.palm, four.causal, four.matmul) == (plain.palm, plain.causal, plain.matmul)
    assert four.hardware_matmul == plain.matmul + 4 * 2 * rerun
    assert four.hardware == plain.hardware + 4 * (2 * rerun + 2 * 768 * 1024)


@pytest.mark.parametrize("switches", [dict(), dict(norm_position="post"),
                                      dict(norm="rmsnorm", pos_encoding="rope", mlp="swiglu", mlp_hidden=43,
                                           bias=False, n_kv_head=1)], ids=["gpt2", "post-norm", "llama-gqa"])
def test_recomputation_counted_as_torch_runs_it(switches):
    """The matmul FLOPs a recomputed step runs more than a plain one, by torch's counter (SDPA's
    math backend, whose matmuls it sees; it charges the whole score matrix, the hardware count
    its causal half), equal the hardware count's: torch's checkpoint stops once backward has what
    it saved, before a pre-norm block's last matmul."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, **switches)
    net, idx = GPT(config), torch.randint(0, 64, (2, 12))
    counted = []
    for blocks in (0, 2):
        net.recompute_blocks(blocks)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            net(idx, idx)[1].backward()
        counted.append(counter.get_total_flops())
    plain, recomputed = flops_per_token(config, 12), flops_per_token(config, 12, recomputed=2)
    extra = recomputed.recomputed_matmul + 2 * recomputed.recomputed_attention_unit * 2  # whole score matrix
    assert counted[1] - counted[0] == extra * idx.numel() and plain.recomputed_matmul == 0


def test_causal_attention_is_half_of_what_torch_counts_for_sdpa():
    """The attention benchmarks' TFLOPS: torch's flop counter counts SDPA's two matmuls over the
    whole T x T score matrix; causal attention computes half of it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    B, H, T, D = 2, 3, 40, 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # (its matmuls, counted)
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert causal_attention_fwd_flops(B, H, T, D) == counter.get_total_flops() / 2


def test_numpy_counts_do_not_wrap():
    """numpy's int32 (what an array of sequence lengths holds) counts as Python's ints do, where
    its own arithmetic wraps past 2^31: GPT-2 XL at 32k tokens, or recomputing all 48 blocks."""
    np = pytest.importorskip("numpy")
    from bench.plan import peak_bytes

    config = GPTConfig(**preset("gpt2-xl"))
    assert flops_per_token(config, np.int32(32768), np.int32(48)) == flops_per_token(config, 32768, 48)
    assert peak_bytes(config, "adamw", np.int32(32), np.int32(1024)) == peak_bytes(config, "adamw", 32, 1024)


def test_gpt2_equals_nanogpt_6n_plus_attention():
    """nanoGPT's estimate_mfu: 6N + 12·L·H·Q·T, N = all parameters minus wpe (its 123.69M, the
    norm and bias vectors included)."""
    config = GPTConfig(**preset("gpt2"))
    m = model(config)
    n_nanogpt = m.num_params() - m.wpe.weight.numel()
    assert n_nanogpt == 123_689_472
    assert flops_per_token(config).palm == 6 * n_nanogpt + 12 * ATTENTION_UNIT
    assert vector_param_count(config) == sum(p.numel() for p in m.parameters() if p.dim() == 1) == GPT2_VECTORS


def test_llama_by_hand():
    """LLaMA-style at GPT-2 small's size: SwiGLU hidden 2048 (gate and up in one matmul), untied
    head, no biases. Its blocks hold gpt2's matmul weights."""
    config = GPTConfig(**preset("llama"))
    layer = 768 * 3 * 768 + 768 * 768 + 768 * 2 * 2048 + 2048 * 768
    assert layer == GPT2_LAYER_WEIGHTS
    f = flops_per_token(config)
    norms = (2 * 12 + 1) * 768  # RMSNorm weights: the only vectors
    assert f.palm == 6 * (12 * layer + 768 * 50304 + norms) + 12 * ATTENTION_UNIT == 854_770_176
    # Untied: the token embedding is a lookup, not a matmul; the head is one. torchtitan's N: all
    # parameters minus the token embedding.
    m = model(config)
    assert f.palm == 6 * (m.num_params() - m.wte.weight.numel()) + 12 * ATTENTION_UNIT


def test_grouped_query_counts_the_narrower_kv_projections_only():
    config = GPTConfig(**(preset("llama") | dict(n_kv_head=4)))
    qkv = 768 * (12 + 2 * 4) * 64  # 12 query heads, 4 key and 4 value heads of 64
    layer = qkv + 768 * 768 + 768 * 2 * 2048 + 2048 * 768
    f = flops_per_token(config)
    # Every query head still scores every key: attention FLOPs do not shrink.
    assert f.matmul + 12 * ATTENTION_UNIT == 6 * (12 * layer + 768 * 50304) + 12 * ATTENTION_UNIT == 798_031_872


def test_sequence_length_changes_only_attention():
    config = GPTConfig(**preset("gpt2"))
    short, long = flops_per_token(config, 256), flops_per_token(config, 2048)
    assert short.matmul == long.matmul
    assert long.palm - short.palm == 12 * 12 * 768 * (2048 - 256)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("change", [{}, {"norm_position": "post"}, {"tie_weights": False},
                                    {"bias": False, "mlp": "swiglu"}, {"pos_encoding": "rope", "norm": "rmsnorm"}])
def test_param_count_matches_the_model(name, change):
    config = GPTConfig(**(preset(name) | change))
    assert param_count(config) == model(config).num_params()


def test_matmul_shapes_are_the_models_linear_layers():
    config = GPTConfig(**preset("llama"))
    m = model(config)
    linear = {tuple(mod.weight.shape) for mod in m.modules() if isinstance(mod, torch.nn.Linear)}
    assert {(mm.n_out, mm.n_in) for mm in matmuls(config)} == linear


def test_the_stated_convention_is_the_count_mfu_uses():
    """CONVENTION, in every bench.mfu result file and its report's title, gives the count's own factors."""
    unit = Flops(matmul=0, vectors=0, attention_unit=1)  # attention alone, one L·H·Q·T
    assert (unit.palm, unit.hardware) == (12, 7)
    assert f"6N + {unit.palm}*L*H*Q*T" in CONVENTION and f"({unit.hardware}*L*H*Q*T)" in CONVENTION
