"""bench.breakdown: kernel names to kinds of work, and the profiler's times per kind."""
import os

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from bench import breakdown

# Kernel names as the profiler reports them on a GPU (cuBLAS, cuDNN, flash, Inductor, torch,
# this project's Triton kernels), and op names as it reports them on a CPU.
NAMES = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel__5x_cublas": "matmul",
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matmul",
    "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn": "matmul",
    "cutlass3x_sm90_tensorop_s64x128x16gemm_bf16_bf16_f32_void_bf16_128x256x64_1x2x1_0_tnn_align8": "matmul",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0": "attention",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t>, true>": "attention",
    "_attn_fwd": "attention", "_attn_bwd_dkdv": "attention", "_attn_bwd_delta": "attention",
    "_norm_fwd_kernel": "norm", "_norm_bwd_kernel": "norm", "_norm_sum_partials_kernel": "norm",
    "_cross_entropy_fwd_kernel": "loss", "_cross_entropy_bwd_kernel": "loss",
    "_adamw_kernel": "optimizer", "_sum_squares_kernel": "optimizer", "_sqrt_of_sum_kernel": "optimizer",
    "_swiglu_bwd_kernel": "elementwise", "_rope_kernel": "elementwise",
    "triton_red_fused__to_copy_native_layer_norm_native_layer_norm_backward_3": "norm",
    "triton_per_fused__log_softmax__to_copy_nll_loss_forward_5": "loss",
    "triton_poi_fused__to_copy_0": "copy", "triton_poi_fused_cat_3": "copy",
    "triton_poi_fused_add_gelu_1": "elementwise",
    # an H200's LLaMA step under torch.compile (2026-12-04): RoPE, SwiGLU's backward, a real copy
    "triton_poi_fused__to_copy_add_arange_cat_cos_div_mul_neg_pow_sin_slice_view_9": "elementwise",
    "triton_poi_fused__to_copy_cat_mul_silu_silu_backward_view_5": "elementwise",
    "triton_poi_fused__to_copy__unsafe_view_cat_clone_transpose_view_10": "copy",
    "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&)>": "elementwise",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>": "optimizer",
    "void at::native::lpnorm_cleanup<float, (at::native::NormType)1, float, float>": "optimizer",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "norm",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>": "loss",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<OpaqueType<2u>, unsigned int, 3, 128, 1>": "copy",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>": "copy",
    "Memcpy DtoD (Device -> Device)": "copy", "Memset (Device)": "copy",
    "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>": "embedding",
    "void at::native::(anonymous namespace)::embedding_backward_feature_kernel<c10::BFloat16, float, long>": "embedding",
    "aten::mm": "matmul", "aten::addmm": "matmul", "aten::native_layer_norm": "norm",
    "tritongpt::attention_fwd": "attention", "tritongpt::attention_rope_fwd": "attention", "aten::cat": "copy", "aten::_log_softmax": "loss",
    "aten::scatter_add_": "elementwise",
    # torch's gradient clipping (a NormTwoOps reduction per tensor): the optimizer's, not a norm layer's
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<float, float, float>, "
    "unsigned int, float, 4, 4>>(at::native::ReduceOp<float, at::native::NormTwoOps<float, float, float>, unsigned "
    "int, float, 4, 4>)": "optimizer",
    "aten::linalg_vector_norm": "optimizer",
    # torch's LayerNorm backward, and RMSNorm as torch and Inductor write it
    "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<c10::BFloat16, float, 32u, 32u, "
    "256u, false, true, true>(long, long, c10::BFloat16 const*, c10::BFloat16 const*, float const*, float const*, "
    "c10::BFloat16*, c10::BFloat16*)": "norm",
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float, float>": "norm",
    "void at::native::(anonymous namespace)::ComputeInternalGradientsCUDAKernel<c10::BFloat16>": "norm",
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_2": "norm",
    "void at::native::vectorized_elementwise_kernel<4, at::native::rsqrt_kernel_cuda(at::TensorIteratorBase&)>": "norm",
    # the embedding's backward: sorted ids, summed by segments
    "void at::native::(anonymous namespace)::krn_partials_per_segment<long>(long*, long const*, long, long)":
        "embedding",
    "void at::native::(anonymous namespace)::compute_grad_weight<c10::BFloat16, float, long>": "embedding",
    "void at::native::(anonymous namespace)::sum_and_scatter<c10::BFloat16, float, long>": "embedding",
    "void cub::CUB_200700_900_NS::DeviceScanKernel<cub::DeviceScanPolicy<long, std::plus<long>>>": "embedding",
    # cuBLASLt's split-K sum of a matmul's partial products: the matmul's work, though it says reduce
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, false, false, false>"
    "(cublasLt::cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*)": "matmul",
    # Inductor's persistent reductions: a cast fused in is no copy (its other ops say), alone it is one
    "triton_per_fused__to_copy_sum_3": "elementwise", "triton_per_fused__to_copy_0": "copy",
    "a kernel nobody named": "other",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",
    "triton_tem_fused_addmm_0": "matmul",
    "aten::bmm": "matmul",
    "cutlass::device_kernel<cutlass3x_sm90_tensorop_bf16_128x256x64_warpspecialized_cooperative>": "matmul",
    "aten::nll_loss_forward": "loss",
    "void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<long>": "embedding",
    "void cub::DeviceRunLengthEncodeKernel<long>": "embedding",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
    "at::detail::Array<char*, 1>>": "copy",
    "triton_poi_fused_clone_permute_0": "copy",  # a permute moves data
}


@pytest.mark.parametrize("name,kind", NAMES.items(), ids=lambda x: x[:40] if isinstance(x, str) else x)
def test_kernel_names_sort_into_kinds(name, kind):
    assert breakdown.kind(name) == kind


def test_times_per_kind_and_top():
    times = {"_attn_fwd": 3000.0, "nvjet_tst_128x256": 9000.0, "Memset (Device)": 30.0, "mystery": 60.0}
    split = breakdown.by_kind(times, steps=3)
    assert split["matmul"] == 3.0 and split["attention"] == 1.0 and split["other"] == pytest.approx(0.02)
    assert tuple(split) == breakdown.SHOWN and split["norm"] == 0.0
    assert set(breakdown.SHOWN) == {k for k, _ in breakdown.KINDS} | {breakdown.OTHER}
    assert [t["name"] for t in breakdown.top(times, steps=3, n=2)] == ["nvjet_tst_128x256", "_attn_fwd"]


def test_profile_steps_on_cpu_times_the_ops():
    a = torch.randn(256, 256)
    times = breakdown.profile_steps(lambda: (a @ a).relu(), steps=2, device=torch.device("cpu"))
    split = breakdown.by_kind(times, steps=2)
    assert split["matmul"] > 0 and split["elementwise"] > 0


def test_gpu_annotations_are_not_counted_as_work():
    """On a GPU the profiler lists record_function spans over the kernels they enclose (every
    optimizer step is one): counted, they would double the optimizer's time."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(name, start, end, annotation=False):
        return FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, device_type=DeviceType.CUDA,
                             is_user_annotation=annotation)

    events = [event("Optimizer.step#BF16AdamW.step", 0, 10, annotation=True), event("_adamw_kernel", 1, 9)]
    assert breakdown._times(events, cuda=True) == {"_adamw_kernel": 8}


def test_a_report_sorts_kept_kernels_by_todays_rules():
    """bench.mfu keeps every kernel's ms a step: a report sorts them by the rules of its own day,
    the matmul and attention rates moved with their kinds' times; a file of top kernels alone
    is shown as it was sorted."""
    times = {"nvjet_tst_128x256": 9000.0, "GammaBetaBackwardCUDAKernelTemplate": 600.0, "_attn_fwd": 3000.0}
    kept = breakdown.per_kernel(times, steps=3)
    assert list(kept) == ["nvjet_tst_128x256", "_attn_fwd", "GammaBetaBackwardCUDAKernelTemplate"]
    old = dict(busy=0.5, ms=dict(breakdown.kinds_of({}), matmul=2.0, attention=1.0, other=0.2),
               matmul_tflops=300.0, attention_tflops=100.0)
    new = breakdown.resorted(dict(old, kernels=kept))
    assert new["ms"]["norm"] == pytest.approx(0.2) and new["ms"]["other"] == 0.0
    assert new["matmul_tflops"] == pytest.approx(200.0) and new["attention_tflops"] == pytest.approx(100.0)
    assert breakdown.resorted(old) is old
    assert breakdown.cells(dict(old, kernels=kept))[3] == "0.20"  # the norm column


def test_cpu_ops_count_their_self_time_not_their_childrens():
    """On a CPU an op's time encloses the ops it calls (aten::linear calls aten::addmm): counting
    each op's whole time would count the addmm twice."""
    def event(name, start, end):
        return FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, device_type=DeviceType.CPU)

    linear, addmm = event("aten::linear", 0, 10), event("aten::addmm", 2, 9)
    linear.append_cpu_child(addmm)
    assert breakdown._times([linear, addmm], cuda=False) == {"aten::linear": 3, "aten::addmm": 7}


def test_a_breakdowns_busy_fraction_is_shown_as_a_percentage():
    summary = dict(busy=0.85, ms=breakdown.kinds_of({}), matmul_tflops=None, attention_tflops=None)
    assert breakdown.cells(summary)[0] == "85%"


def test_a_kind_left_without_kernels_by_todays_rules_has_no_rate():
    """A file's matmul time may all move to other kinds when sorted again: its matmul rate is then
    none, not a division by zero."""
    old = dict(busy=0.5, ms=dict(breakdown.kinds_of({}), matmul=2.0), matmul_tflops=300.0, attention_tflops=None,
               kernels={"GammaBetaBackwardCUDAKernelTemplate": 2.0})
    new = breakdown.resorted(old)
    assert new["ms"]["matmul"] == 0.0 and new["ms"]["norm"] == 2.0
    assert new["matmul_tflops"] is None and breakdown.cells(old)[-2:] == ["n/a", "n/a"]


def test_profiling_tears_cupti_down_after_it(monkeypatch):
    """Left attached, CUPTI slows the kernels bench.mfu times after a profile (its next variants)."""
    monkeypatch.setenv("TEARDOWN_CUPTI", "")  # (so that the test's end restores the environment as it was)
    monkeypatch.delenv("TEARDOWN_CUPTI")
    breakdown.profile_steps(lambda: torch.ones(4) + 1, 1, torch.device("cpu"))
    assert os.environ["TEARDOWN_CUPTI"] == "1"


def test_a_kinds_time_is_the_sum_of_its_kernels():
    split = breakdown.kinds_of({"aten::mm": 1.0, "aten::addmm": 2.0, "_attn_fwd": 0.5})
    assert split["matmul"] == 3.0 and split["attention"] == 0.5


def test_top_gives_ms_a_step():
    assert breakdown.top({"aten::mm": 6000.0}, steps=3) == [dict(name="aten::mm", kind="matmul", ms=2.0)]


def test_gpu_kernels_of_one_name_sum_their_times():
    def event(name, start, end):
        return FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, device_type=DeviceType.CUDA)
    assert breakdown._times([event("_adamw_kernel", 0, 4), event("_adamw_kernel", 10, 13)], cuda=True) == {
        "_adamw_kernel": 7}


def test_profile_steps_runs_every_step():
    calls = []
    breakdown.profile_steps(lambda: calls.append(torch.ones(2) + 1), steps=3, device=torch.device("cpu"))
    assert len(calls) == 3
