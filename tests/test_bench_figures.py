"""bench's reported figures (FLOPs, peaks, MFU, rates, plans, profile choices) pinned: each test
holds a behaviour that a mutation test of bench/ (2026-12-05) found no test held, against a value
derived by hand or taken from a datasheet, not recomputed by the code under test."""
import functools
import json
import sys
import types
import warnings

import pytest
import torch

import kernels
from bench import hardware, markdown_table, measure, mfu, plan, profile
from bench.cases import Shapes
from bench.flops import flops_per_token, param_count
from bench.hardware import ClockSampler, ClockStats, Device, find, match, peak_for
from gpt.model import GPT, GPTConfig, preset
from tests.devices import H100

GPT2 = GPTConfig(**preset("gpt2"))
H = 768
LAYER_W = 768 * 3 * 768 + 768 * 768 + 2 * 768 * 3072  # 7,077,888 matmul weights a GPT-2 layer
RERUN_W = LAYER_W - 3072 * 768  # those a recomputed pre-norm block runs again: all but the MLP output projection
PALM_1024 = 855_383_040  # GPT-2 124M at T=1024, hand-derived in tests/test_flops.py
HW_1024 = 807_469_056


def palm_gpt2(T):  # 6 x matmul weights + 6 x vectors + 12·L·C·T
    return 741_408_768 + 728_064 + 12 * 12 * 768 * T


# --- bench/flops.py ------------------------------------------------------------------------------

def test_gqa_does_not_shrink_attention_flops():
    """Every query head scores every key, so GQA keeps 12·L·n_embd·T."""
    config = GPTConfig(**(preset("llama") | dict(n_kv_head=4)))
    qkv = 768 * (12 + 2 * 4) * 64
    layer = qkv + 768 * 768 + 768 * 2 * 2048 + 2048 * 768
    norms = (2 * 12 + 1) * 768
    assert flops_per_token(config).palm == 6 * (12 * layer + 768 * 50304 + norms) + 12 * 12 * 768 * 1024
    assert flops_per_token(config).hardware == 6 * (12 * layer + 768 * 50304) + 7 * 12 * 768 * 1024


def test_recomputed_attention_is_at_the_runs_sequence_length():
    """At T=256 a recomputed block's attention forward is 2·C·256 a token, not 2·C·1024."""
    plain, four = flops_per_token(GPT2, 256), flops_per_token(GPT2, 256, recomputed=4)
    assert four.hardware - plain.hardware == 4 * (2 * RERUN_W + 2 * 768 * 256)


def test_one_layer_model_param_count_and_recompute_flops():
    """A one-layer model's lm head (counted once, as its blocks' matmuls then are) is no block
    matmul: not in the parameter count's biases, a recomputed block or the cast copies."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=16, vocab_size=64)
    with torch.device("meta"):
        model = GPT(config)
    assert param_count(config) == model.num_params()
    layer = 64 * 3 * 64 + 64 * 64 + 2 * 64 * 256
    assert flops_per_token(config, recomputed=1).hardware_matmul - flops_per_token(config).matmul == 2 * (
        layer - 256 * 64)  # all but the MLP's output projection
    assert plan.cast_copy_bytes(config, "adamw", "ddp") == 2 * layer


# --- bench/hardware.py ---------------------------------------------------------------------------

# Dense figures, sparse datasheet figures halved: (bf16, tf32, SMs, memory GB).
DATASHEET = {
    "h100-sxm": (989.4, 494.7, 132, 80),  # H100 SXM: 1979 / 989 sparse
    "h100-pcie": (756.5, 378, 114, 80),  # H100 PCIe: 1513 / 756 sparse, 114 SMs
    "h100-nvl": (835.5, 417.5, 132, 94),  # H100 NVL: 1671 / 835 sparse
    "h200-nvl": (835.5, 417.5, 132, 141),
    "a100-sxm-80gb": (312, 156, 108, 80),  # A100: 624 / 312 sparse
    "a100-pcie-40gb": (312, 156, 108, 40),
    "a10": (125, 62.5, 72, 24),  # A10: 250 / 125 sparse
    "gb200": (2500, 1250, None, 186),  # GB200 NVL72: 360 PF fp16 sparse / 72 / 2
    "b200": (2250, 1125, 148, 180),  # HGX B200: 36 PF fp16 sparse / 8 / 2; 1.44 TB / 8
    "rtx-3090": (71, 35.6, 82, 24),  # GA102 whitepaper, fp32 accumulate
    "rtx-5090": (209.5, 104.8, 170, 32),
}


@pytest.mark.parametrize("key", DATASHEET)
def test_rows_match_the_datasheets(key):
    """The rows' dense bf16 and tf32 rates, SMs and memory are their datasheets' (sparse figures halved)."""
    gpu = find(key)
    bf16, tf32, sms, memory = DATASHEET[key]
    assert (gpu.tflops("bfloat16"), gpu.tflops("float32"), gpu.sms, gpu.memory_gb) == (bf16, tf32, sms, memory)


# fp8 as the datasheet prints it (sparse: halved here), memory GB, bandwidth TB/s: what bench.plan
# and bench.mfu's tables print.
DATASHEET_FP8_MEMORY = {
    "v100-sxm2-16gb": (None, False, 16, 0.9),  # V100 datasheet: 900 GB/s, no fp8
    "a100-sxm-40gb": (None, False, 40, 1.555),  # A100 datasheet: 1,555 GB/s
    "a100-sxm-80gb": (None, False, 80, 2.039),  # 2,039 GB/s
    "a100-pcie-80gb": (None, False, 80, 1.935),  # 1,935 GB/s
    "l4": (485, True, 24, 0.3),  # L4 datasheet: FP8 485 TFLOPS sparse, 300 GB/s
    "l40": (724, True, 48, 0.864),  # L40 datasheet: FP8 724 sparse, 864 GB/s
    "l40s": (1466, True, 48, 0.864),  # L40S datasheet: FP8 1,466 sparse
    "h100-sxm": (3958, True, 80, 3.35),  # H100 datasheet: FP8 3,958 sparse, 3.35 TB/s
    "h100-pcie": (3026, True, 80, 2.0),  # 3,026 sparse, 2 TB/s
    "h100-nvl": (3341, True, 94, 3.9),  # 3,341 sparse, 94 GB, 3.9 TB/s
    "h200-sxm": (3958, True, 141, 4.8),  # H200 datasheet: 3,958 sparse, 141 GB, 4.8 TB/s
    "h200-nvl": (3341, True, 141, 4.8),
    "gh200-96gb": (3958, True, 96, 4.0),  # GH200 datasheet: 96 GB HBM3 4 TB/s
    "gh200-144gb": (3958, True, 144, 4.9),  # 144 GB HBM3e 4.9 TB/s
    "gb200": (720_000 / 72, True, 186, 8.0),  # GB200 NVL72: 720 PF FP8 sparse, 13.4 TB, 576 TB/s over 72 GPUs
    "rtx-3090": (None, False, 24, 0.936),  # GA102 whitepaper: 936 GB/s, no fp8
    "rtx-4090": (330.3, False, 24, 1.008),  # Ada whitepaper: FP8 with FP32 accumulate 330.3 dense
    "rtx-5090": (419, False, 32, 1.792),  # RTX Blackwell whitepaper: FP8 with FP32 accumulate 419 dense
}


@pytest.mark.parametrize("key", DATASHEET_FP8_MEMORY)
def test_rows_fp8_memory_and_bandwidth_match_the_datasheets(key):
    gpu = find(key)
    fp8, sparse, memory, bandwidth = DATASHEET_FP8_MEMORY[key]
    assert gpu.fp8 == (None if fp8 is None else pytest.approx(fp8 / 2 if sparse else fp8, rel=1e-3))
    assert (gpu.memory_gb, gpu.bandwidth_tbs) == (memory, bandwidth)


# fp16 tensor and fp32 (non-tensor) TFLOPS of rows DATASHEET does not hold.
DATASHEET_FP16_FP32 = {
    "v100-pcie-16gb": (112, 14),  # V100 datasheet, PCIe: 112 tensor TFLOPS, 14 fp32
    "v100-sxm2-32gb": (125, 15.7),  # SXM2: 125, 15.7
    "b200": (36_000 / 8 / 2, 600 / 8),  # HGX B200: 36 PF fp16 sparse, 600 TF fp32, over 8 GPUs
    "h100-pcie": (1513 / 2, 51),  # H100 datasheet, PCIe: 1,513 sparse, 51 TF fp32
}


@pytest.mark.parametrize("key", DATASHEET_FP16_FP32)
def test_rows_fp16_and_fp32_match_the_datasheets(key):
    fp16, fp32 = DATASHEET_FP16_FP32[key]
    assert (find(key).fp16, find(key).fp32) == (pytest.approx(fp16, rel=1e-3), pytest.approx(fp32, rel=5e-3))


def test_an_h100_pcie_reporting_its_114_sms_has_its_peak():
    """The PCIe row's SMs are 114; a real H100 PCIe (114 SMs) must not be refused."""
    assert peak_for("NVIDIA H100 PCIe", "bfloat16", sms=114).tflops == 756.5


def test_a_device_with_more_sms_than_its_row_is_refused():
    """An SM count above the row's is another product too."""
    with pytest.warns(UserWarning, match="reports 132 SMs"):
        assert peak_for("NVIDIA H100 PCIe", "bfloat16", sms=132).tflops is None


def test_sxm5_and_ambiguous_names():
    """SXM5 is a revision word; a name two rows account for equally is unknown."""
    assert match("NVIDIA H100 SXM5 80GB").key == "h100-sxm"
    assert match("NVIDIA A100 40GB 80GB") is None


def _sampler(mhz, watts):
    s = ClockSampler()
    s._mhz, s._watts = list(mhz), list(watts)
    return s


def test_clock_stats_are_means_and_clear_between_intervals():
    """The clock and power are the interval's means, and stats(clear=True) starts the next interval."""
    s = _sampler([1000, 1000, 1000, 2000], [100, 300])
    stats = s.stats(clear=True)
    assert (stats.sm_mhz, stats.min_sm_mhz, stats.max_sm_mhz, stats.power_w, stats.samples) == (1250, 1000, 2000,
                                                                                                 200, 4)
    assert s.stats() is None
    s._mhz.append(2000.0)
    s._watts.append(300.0)
    assert s.stats().power_w == 300.0  # the last interval's power gone too


def _torch_device(monkeypatch, name="NVIDIA H100 80GB HBM3", memory=80 * 2**30):
    """torch.cuda standing in for a GPU: device 0 named `name`, with `memory` bytes."""
    props = types.SimpleNamespace(name=name, multi_processor_count=132, total_memory=memory, major=9, minor=0,
                                  uuid="8f0e2a1c-0000-1111-2222-333344445555")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)


def _nvml(monkeypatch, unsupported=False, sm_mhz=1980, memory=80 * 2**30):
    """A stand-in pynvml answering for an H100 (its SM clock's maximum `sm_mhz`, other clocks
    2619), or, `unsupported`, raising its NVMLError for every query."""
    class NVMLError(Exception):
        pass

    def answer(value):
        def query(*args):
            if unsupported:
                raise NVMLError("Not Supported")
            return value(*args)
        return query
    fake = types.SimpleNamespace(NVMLError=NVMLError, NVML_CLOCK_SM=1)
    fake.nvmlDeviceGetEnforcedPowerLimit = answer(lambda h: 700_000)
    fake.nvmlDeviceGetMemoryInfo = answer(lambda h: types.SimpleNamespace(total=memory))
    fake.nvmlDeviceGetName = answer(lambda h: b"NVIDIA H100 80GB HBM3")
    fake.nvmlSystemGetDriverVersion = answer(lambda: b"550.0")
    fake.nvmlDeviceGetMaxClockInfo = answer(lambda h, clock: sm_mhz if clock == fake.NVML_CLOCK_SM else 2619)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(hardware, "_nvml_handle", lambda index: object())


def test_detect_reports_gib_and_watts(monkeypatch):
    """Memory in GiB; NVML's power limit in mW reported in W."""
    _torch_device(monkeypatch)
    monkeypatch.setattr(hardware, "_nvml_handle", lambda index: None)
    assert hardware.detect(0).memory_gib == 80.0
    _nvml(monkeypatch)
    d = hardware.detect(0)
    assert (d.memory_gib, d.power_limit_w, d.max_sm_mhz, d.driver) == (80.0, 700.0, 1980, "550.0")


def test_detect_takes_nvmls_name_memory_and_sm_clock_where_it_answers(monkeypatch):
    """NVML where it answers, else torch; the SM clock's maximum, not another clock's."""
    _torch_device(monkeypatch, name="GPU 0")
    _nvml(monkeypatch, memory=81559 * 2**20)
    d = hardware.detect(0)
    assert d.name == "NVIDIA H100 80GB HBM3" and d.slug == "h100-sxm"
    assert d.memory_gib == pytest.approx(81559 / 1024) and d.max_sm_mhz == 1980


def test_detect_where_nvml_supports_no_query(monkeypatch):
    """A GPU or driver that answers no query (the handle found): torch's device, nothing NVML-only."""
    _torch_device(monkeypatch)
    _nvml(monkeypatch, unsupported=True)
    d = hardware.detect(0)
    assert (d.name, d.memory_gib, d.driver, d.power_limit_w, d.max_sm_mhz) == (
        "NVIDIA H100 80GB HBM3", 80.0, None, None, None)


def test_the_nvml_handle_is_found_by_torchs_uuid(monkeypatch):
    """NVML's nvmlDeviceGetHandleByUUID needs the "GPU-" prefix torch's UUID lacks; no driver, no handle."""
    _torch_device(monkeypatch)
    asked = []
    fake = types.SimpleNamespace(nvmlInit=lambda: None,
                                 nvmlDeviceGetHandleByUUID=lambda uuid: asked.append(uuid) or "handle")
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert hardware._nvml_handle(0) == "handle"
    assert asked == ["GPU-8f0e2a1c-0000-1111-2222-333344445555"]

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")
    monkeypatch.setattr(fake, "nvmlInit", no_driver)
    assert hardware._nvml_handle(0) is None


# --- bench/mfu.py --------------------------------------------------------------------------------

def _row(ms, **extra):
    return dict(variant="triton", kernels={}, step_ms=ms, loss=10.9, peak_memory_gib=20.0, clocks=None) | extra


def _run(**kw):
    return mfu.Run(**(dict(config=GPT2, batch_size=16, seq_len=1024, optimizer="adamw", dtype=torch.bfloat16,
                           warmup=1, steps=10) | kw))


def test_summarize_hw_tflops_and_median():
    """HW TFLOPS on the hardware count; tokens/s from the median, not the mean."""
    peak = peak_for("NVIDIA H100 80GB HBM3", "bfloat16")
    out = mfu.summarize(_row([10.0] * 5 + [100.0] * 4), _run(), flops_per_token(GPT2, 1024), peak)
    tokens_per_s = 16 * 1024 / 0.010
    assert out["tokens_per_s"] == pytest.approx(tokens_per_s)
    assert out["tflops"] == pytest.approx(tokens_per_s * PALM_1024 / 1e12)
    assert out["hw_tflops"] == pytest.approx(tokens_per_s * HW_1024 / 1e12)
    assert out["mfu"] == pytest.approx(tokens_per_s * PALM_1024 / 1e12 / 989.4)


def test_clock_rates_against_the_mean_clock():
    """MFU at clock divides by the clock's peak; the mean clock, not the max."""
    peak = peak_for("NVIDIA H100 80GB HBM3", "bfloat16")
    rates = mfu._clock_rates(500.0, peak, ClockStats(1500.0, 1000.0, 1980.0, None, 10))
    at_1500 = 132 * 4096 * 1500e6 / 1e12  # SMs x FLOPs/clock/SM x clock
    assert rates["clock_peak_tflops"] == pytest.approx(at_1500)
    assert rates["mfu_at_clock"] == pytest.approx(500.0 / at_1500)


def test_zero_ms_of_attention_gives_no_rate():
    """A breakdown with no attention kernel time (none found) must not divide by zero."""
    ms = dict(matmul=20.0, attention=0.0, norm=2.0)
    row = _row([30.0, 30.0], breakdown=dict(steps=3, ms=ms, top=[]))
    peak = peak_for("NVIDIA H100 80GB HBM3", "bfloat16")
    b = mfu.summarize(row, _run(steps=2), flops_per_token(GPT2, 1024), peak)["breakdown"]
    assert b["attention_tflops"] is None


class _Clocks:
    def __init__(self):
        self.clears = []

    def stats(self, clear=False):
        self.clears.append(clear)
        return ClockStats(1500.0, 1400.0, 1600.0, 650.0, 20)

    def stop(self):
        pass


def test_meter_at_seq_len_with_recompute_and_clock():
    """The meter counts its sequence length and recomputed blocks, and reports the clock of each interval."""
    meter = mfu.MFUMeter(GPT2, 256, "bfloat16", "cpu", peak_tflops=100.0, recomputed=12)
    meter.peak = peak_for("NVIDIA H100 80GB HBM3", "bfloat16")
    meter.clocks = _Clocks()
    rec = meter.record(10_000)
    assert rec["tflops"] == pytest.approx(10_000 * palm_gpt2(256) / 1e12)
    hw = 741_408_768 + 7 * 12 * 768 * 256 + 12 * (2 * RERUN_W + 2 * 768 * 256)
    assert rec["hw_tflops"] == pytest.approx(10_000 * hw / 1e12)
    assert rec["sm_mhz"] == 1500.0 and rec["clock_peak_tflops"] == pytest.approx(132 * 4096 * 1500e6 / 1e12)
    assert meter.clocks.clears == [True]


def test_meter_refuses_a_gpu_whose_sms_are_not_its_rows(monkeypatch):
    """Train.py's meter passes the device's SMs (an H100 PCIe named like the SXM)."""
    monkeypatch.setattr(mfu, "detect", lambda index: Device(0, "NVIDIA H100 80GB HBM2e", 114, 80.0, (9, 0)))
    with pytest.warns(UserWarning, match="reports 114 SMs"):
        meter = mfu.MFUMeter(GPT2, 1024, "bfloat16", "cuda:0")
    assert meter.peak.tflops is None


def _main_json(monkeypatch, tmp_path, device, *flags):
    """Bench.mfu --gpu auto on a stand-in device: the result file after the first variant, and runs seen."""
    monkeypatch.setattr(mfu, "detect", lambda: device)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    seen = []

    def measure(run, variant, device):
        seen.append(run)
        if len(seen) > 1:
            raise KeyboardInterrupt
        return {"variant": variant, "error": "measured"}
    monkeypatch.setattr(mfu, "measure", measure)
    out = tmp_path / "mfu.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unknown or mismatched GPU's warning
        with pytest.raises(KeyboardInterrupt):
            mfu.main(["--gpu", "auto", "--kernels", "torch,triton", "--json", str(out), *flags])
    return json.loads(out.read_text()), seen


def test_result_file_flops_and_peak(monkeypatch, tmp_path):
    """The result file's PaLM FLOPs and peak."""
    result, _ = _main_json(monkeypatch, tmp_path, H100)
    assert result["flops_per_token"] == {"palm": PALM_1024, "causal": 798_759_936, "hardware": HW_1024}
    assert result["peak"]["tflops"] == 989.4


def test_result_file_at_seq_len_and_recompute(monkeypatch, tmp_path):
    """Recomputation in the hardware count; --seq-len."""
    result, seen = _main_json(monkeypatch, tmp_path, H100, "--seq-len", "256", "--recompute", "12")
    assert seen[0].seq_len == 256 and result["seq_len"] == 256
    assert result["flops_per_token"]["palm"] == palm_gpt2(256)
    assert result["flops_per_token"]["hardware"] == (741_408_768 + 7 * 12 * 768 * 256
                                                     + 12 * (2 * RERUN_W + 2 * 768 * 256))


def test_measured_peak_uses_the_devices_sms(monkeypatch, tmp_path):
    """An H100 PCIe (114 SMs) named like the SXM gets no peak, not 989.4."""
    result, _ = _main_json(monkeypatch, tmp_path, Device(0, "NVIDIA H100 80GB HBM2e", 114, 80.0, (9, 0)))
    assert result["peak"]["tflops"] is None


def test_an_a100_measures_in_bf16(monkeypatch, tmp_path):
    """Compute capability 8.0 has bf16: train.py trains there in bf16."""
    _, seen = _main_json(monkeypatch, tmp_path, Device(0, "NVIDIA A100-SXM4-80GB", 108, 80.0, (8, 0)))
    assert seen[0].dtype == torch.bfloat16


# GPT-2, adamw (fp32 weights, bf16 autocast), 16 x 1024 tokens, by hand:
P_GPT2 = 124_475_904  # nanoGPT's 123,689,472 + wpe's 786,432
HELD = 16 * P_GPT2 + 2 * 12 * LAYER_W + 2 * 4 * 50304 * 768 + 2**30  # states, bf16 copies, loss grads, chunk


def test_planned_peak_gib_by_hand():
    """The planned peak in GiB, with recomputation, the run's optimizer and the loss's 1 GiB chunk."""
    whole = 12 * (2 * 14 * H + 2 * 4 * H) + 4 * H + 4 * H  # bf16 saves + fp32 stream a layer; ln_f input, fp32 grad
    assert mfu.planned_peak_gib(_run()) == pytest.approx((HELD + whole * 16 * 1024) / 2**30, rel=1e-12)
    recomputed = 12 * 4 * H + 11 * 2 * H + 36 * H + 8 * H  # inputs, one block again, head
    assert mfu.planned_peak_gib(_run(recompute=12)) == pytest.approx((HELD + recomputed * 16 * 1024) / 2**30,
                                                                       rel=1e-12)


def test_plan_for_a_gpu_without_bf16(capsys, monkeypatch):
    """Planning a V100 uses its fp16 peak (bf16 has none there)."""
    monkeypatch.setattr(mfu, "detect", lambda: None)
    assert mfu.main(["--gpu", "v100-sxm2-16gb", "--preset", "gpt2"]) == 0
    assert "dense float16 125 TFLOPS" in " ".join(capsys.readouterr().out.split())


def test_near_miss_gpu_names_list_their_candidates_only(capsys):
    """A near-miss GPU name lists the rows it nearly matches, and only those."""
    assert mfu.main(["--gpu", "h100-sx"]) == 2
    out = capsys.readouterr().out
    assert "h100-sxm" in out and "rtx-5090" not in out


# --- bench/plan.py -------------------------------------------------------------------------------

def _plan_lines(capsys, gpus, presets, seq_len=None, micro_batch=16):
    plan.print_plan(plan.Plan(find("h100"), "bfloat16", 989.4, gpus, seq_len, micro_batch),
                    {name: plan.config_for(name) for name in presets}, mfu.Console(width=300))
    return capsys.readouterr().out.splitlines()


def test_plan_throughput_and_hours_by_hand(capsys):
    """PaLM FLOPs; hours on N GPUs."""
    [row] = [line for line in _plan_lines(capsys, 8, ["gpt2"]) if "0.124B" in line]
    cells = [c.strip() for c in row.strip("│┃| ").split("│")]
    rate30, rate60 = 0.30 * 989.4e12 / PALM_1024, 0.60 * 989.4e12 / PALM_1024  # tokens/s per GPU
    assert cells[4] == f"{rate30:,.0f}" and cells[6] == f"{rate60:,.0f}"
    assert cells[7:9] == [f"{1e9 / (rate30 * 8) / 3600:,.3g}", f"{1e9 / (rate60 * 8) / 3600:,.3g}"]


def test_plan_at_a_given_seq_len(capsys):
    """--seq-len 2048 plans GPT-2 at T=2048."""
    [row] = [line for line in _plan_lines(capsys, 1, ["gpt2"], seq_len=2048) if "0.124B" in line]
    assert " 2048 " in row and f"{palm_gpt2(2048) / 1e9:.3g}" in row


def test_a_preset_that_fits_only_recomputing_has_rates(capsys):
    """The giga-175b preset on 256 H100s fits with every block recomputed (bf16_adamw, FSDP)."""
    [row] = [line for line in _plan_lines(capsys, 256, ["giga-175b"]) if "175B" in line]
    assert "does not fit" not in row


@pytest.mark.parametrize("name, billions", [("giga-13b", 13), ("giga-70b", 70), ("giga-175b", 175)])
def test_planning_presets_are_the_size_of_their_name(name, billions):
    """gigaGPT's shapes (n_layer, n_embd): 13B, 70B, 175B within 10%."""
    assert 0.9 <= param_count(plan.config_for(name)) / (billions * 1e9) <= 1.1


def test_recompute_column_for_gpt2_xl_at_32(capsys):
    """GPT-2 XL, 32 x 1024, pure bf16, 80 GiB: 12 of 48 blocks (train.py's plan says so too)."""
    lines = _plan_lines(capsys, 1, ["gpt2-xl"], micro_batch=32)
    [row] = [line for line in lines if "bf16_adamw" in line and "single GPU" in line]
    assert "12 of 48 blocks" in row


# --- bench/measure.py ----------------------------------------------------------------------------

def test_copy_bandwidth_and_matmul_rate_units(monkeypatch):
    """Copy bandwidth counts bytes read and written; a multiply-add is 2 FLOPs; rates in TFLOPS."""
    monkeypatch.setattr(measure, "median_ms", lambda fn: 2.0)
    assert measure.copy_gbs.__wrapped__("meta") == pytest.approx(2 * 2**30 / 2e-3 / 1e9)  # 1 GiB copied in 2 ms
    assert measure._matmul_tflops.__wrapped__("meta", torch.bfloat16, None) == pytest.approx(2 * 8192**3 / 2e-3 / 1e12)


def test_float32_matmul_rate_measured_again_when_tf32_is_switched(monkeypatch):
    """A float32 rate kept from before torch.backends' TF32 setting changed would be the other
    setting's (several times apart on a GPU): the roofline of a float32 kernel follows the setting."""
    times = iter([4.0, 1.0])
    monkeypatch.setattr(measure, "median_ms", lambda fn: next(times))
    monkeypatch.setattr(measure, "_matmul_tflops", functools.cache(measure._matmul_tflops.__wrapped__))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        full = measure.matmul_tflops("meta", torch.float32)
        torch.set_float32_matmul_precision("high")  # TF32
        assert measure.matmul_tflops("meta", torch.float32) == pytest.approx(4 * full)
        torch.set_float32_matmul_precision("highest")
        assert measure.matmul_tflops("meta", torch.float32) == full  # kept: not measured a third time
    finally:
        torch.set_float32_matmul_precision(before)


class _GPU:
    """Events timing each call from `times` in turn; the GPU never catches up."""

    def __init__(self, times):
        self.times, self.i, self.sleeps = times, 0, []
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                pass

            def record(self):
                pass

            def synchronize(self):
                pass

            def query(self):
                return False

            def elapsed_time(self, end):
                t = gpu.times[gpu.i % len(gpu.times)]
                gpu.i += 1
                return t
        self.Event = Event


@pytest.fixture
def gpu(monkeypatch):
    def install(times):
        g = _GPU(times)
        monkeypatch.setattr(torch.cuda, "Event", g.Event)
        monkeypatch.setattr(torch.cuda, "_sleep", g.sleeps.append)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(measure, "L2_FLUSH_BYTES", 64)
        return g
    return install


def test_median_not_mean_of_skewed_times(gpu):
    """The median of skewed times, not their mean or minimum."""
    gpu([2.0, 2.0, 9.0, 1.0])  # any 20 in a row: five 1s, ten 2s, five 9s
    assert measure.median_ms(lambda: None, warmup_ms=1, rep_ms=1) == 2.0


def test_sleep_calibration(gpu):
    """10^7 spin cycles in 10 ms is 10^6 cycles per ms."""
    gpu([10.0])
    assert measure._sleep_cycles_per_ms() == pytest.approx(1e6)


def test_batches_sleep_twice_the_hosts_time_to_queue_them(gpu, monkeypatch):
    """Batches sleep twice the host's time to queue them, counted per call: 1 ms of host time
    between perf_counter calls."""
    g = gpu([1.0])
    clock = iter(range(10**6))
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock) / 1e3)
    measure.median_ms(lambda: None, warmup_ms=1, rep_ms=1)
    # the estimate: 3 calls in 1 ms of host time; then batches of BATCH calls asleep 2 x 20 x 1/3 ms,
    # at 10^7 cycles a ms (the calibration's 10^7 cycles took 1 ms)
    assert g.sleeps[3] == pytest.approx(2 * 20 * (1 / 3) * 1e7, abs=2)


def test_a_batch_whose_first_call_the_gpu_began_is_not_ahead(monkeypatch):
    """The GPU reaching the batch's first call (its start event done) is what makes it not ahead,
    though the last call is still queued: TRIES retries, then unslept."""
    g = _GPU([1.0])
    made = []

    class Event(g.Event):
        def __init__(self, enable_timing=False):
            made.append(self)
            self.start = len(made) % 2 == 1  # batch() makes (start, end) pairs

        def query(self):
            return self.start
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", g.sleeps.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(measure, "L2_FLUSH_BYTES", 64)
    measure.median_ms(lambda: None, warmup_ms=1, rep_ms=1)
    assert set(g.sleeps[3 + measure.TRIES:]) == {0}


def test_one_line_keeps_the_named_exception():
    """A compile worker's error: its first line and the last line naming an exception."""
    assert measure.one_line("compile failed\n  File x.py\nValueError: bad | shape") == (
        "compile failed ... ValueError: bad | shape")


def test_a_markdown_table_escapes_a_bar_in_a_cell():
    assert markdown_table(["a", "b"], [["x | y", "1"]], align="ll").splitlines() == [
        "| a | b |", "| --- | --- |", "| x \\| y | 1 |"]


def test_host_bound_threshold():
    """Host time at 80% of the GPU's marks a pass host-bound, 79% does not."""
    assert measure.host_bound(10.0, 8.0) and not measure.host_bound(10.0, 7.9)


def test_l2_flush_exceeds_every_l2():
    """Larger than the largest L2 here (B200: 126 MB; H100/H200: 50/60 MiB)."""
    assert measure.L2_FLUSH_BYTES >= 2 * 126e6


# --- bench/profile.py ----------------------------------------------------------------------------

def _backend(ms, verified=True):
    return {"ms": {"fwd": ms / 3, "fwd+bwd": ms}, "verified": verified}


def _entry(**backends):
    return {"training_pass": "fwd+bwd", "backends": backends}


def test_a_backend_whose_check_never_ran_is_not_chosen():
    """No "verified" key is not verified."""
    e = _entry(torch=_backend(3.0), triton={"ms": {"fwd+bwd": 1.0}})
    assert profile.fastest_verified(e, ["torch", "triton"], compiled=False)[0] == "torch"


def _workload(config, batch_size, seq_len=None):
    return profile.workload("x", Shapes(config, batch_size, seq_len))


def test_nearness_by_log_ratio_and_sequence_length():
    """Log ratio: 48 is nearer 16 than 2 is; T counts for attention apart from tokens."""
    run = Shapes(GPT2, 16)
    near, far = (profile.distance("attention", _workload(GPT2, n), run) for n in (48, 2))
    assert near < far
    same_tokens_short = _workload(GPT2, 8, 512)  # 4096 tokens at T=512
    same_tokens_long = _workload(GPT2, 4, 1024)  # 4096 tokens at T=1024, the run's T
    assert profile.distance("attention", same_tokens_long, run) < profile.distance("attention", same_tokens_short, run)


def test_nearness_by_the_ops_own_kinds_and_sizes():
    """GQA ratio; RoPE is a kind of attention; swiglu's tokens; the loss's vocab."""
    llama = GPTConfig(**preset("llama"))
    kv4 = GPTConfig(**(preset("llama") | dict(n_kv_head=4)))
    run = Shapes(GPTConfig(**(preset("llama") | dict(n_kv_head=4, vocab_size=32000))), 16)
    near, far = (profile.distance("attention", _workload(c, 16), run) for c in (kv4, llama))
    assert near < far
    gated = Shapes(GPTConfig(**(preset("gpt2") | {"mlp": "swiglu", "norm": "rmsnorm"})), 16)
    assert profile.distance("attention", _workload(GPT2, 16), gated) < profile.distance("attention",
                                                                                        _workload(llama, 16), gated)
    assert profile.distance("swiglu", _workload(llama, 16), Shapes(llama, 16)) < profile.distance(
        "swiglu", _workload(llama, 4), Shapes(llama, 16))
    v32k = GPTConfig(**(preset("gpt2") | dict(vocab_size=32768)))
    run = Shapes(GPTConfig(**(preset("gpt2") | dict(vocab_size=32000))), 16)
    assert profile.distance("linear_cross_entropy", _workload(v32k, 16), run) < profile.distance(
        "linear_cross_entropy", _workload(GPT2, 16), run)


@pytest.mark.parametrize("bad", [0.0, float("inf")])
def test_a_profile_with_a_zero_or_infinite_timing_is_refused(tmp_path, bad):
    """A timing of 0 ms or inf."""
    record = {"workload": _workload(GPT2, 16), "device": {"name": "t", "slug": "t"},
              "ops": {"swiglu": _entry(torch={"ms": {"fwd": 1.0, "fwd+bwd": bad}})}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": profile.FORMAT, "workloads": [record]}))
    with pytest.raises(ValueError, match="lacks its training_pass"):
        profile.load(path)


def test_a_profile_of_a_later_format_is_refused(tmp_path):
    """A profile of a later format is refused, not misread."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": profile.FORMAT + 1, "workloads": [{}]}))
    with pytest.raises(ValueError, match="not a format-2 kernel profile"):
        profile.load(path)


def test_self_check_reports_the_worst_form(monkeypatch):
    """The reason gives the largest error of the forms checked."""
    monkeypatch.setattr(profile, "check_cases", lambda op, shapes, device_type: ["a", "b"])
    monkeypatch.setattr(profile, "margin", lambda c, triton, torch: (None, {"a": 0.5, "b": 0.1}[c]))
    ok, why = profile._check("swiglu", Shapes(GPT2, 1), "cpu", "triton")
    assert ok and "error at most 50% of the bound in 2 forms" in why


def test_the_fingerprint_covers_every_triton_kernel_module():
    """A profile goes stale when any timed op's kernel module changes."""
    modules = {kernels.get(op, "triton").__module__.split(".")[-1] for op in kernels.OPS}
    assert modules - {"registry"} <= set(profile.TIMED_SOURCES), modules
