import math

import pytest
import torch

from bench import hardware
from bench.hardware import GPUS, ClockSampler, Device, find, match, peak_for

BY_KEY = {g.key: g for g in GPUS}


@pytest.mark.parametrize("gpu", GPUS, ids=lambda g: g.key)
def test_every_reported_name_matches_its_own_row(gpu):
    for name in gpu.names:
        assert match(name) is gpu, name
        assert match(name.lower()) is gpu, name.lower()  # torchtitan's lowercase "l40s" mismatch
        assert match(name.upper()) is gpu, name.upper()
    assert find(gpu.key) is gpu


@pytest.mark.parametrize("name, key", [
    ("NVIDIA L4", "l4"), ("NVIDIA L40", "l40"), ("NVIDIA L40S", "l40s"),
    ("NVIDIA H200", "h200-sxm"), ("NVIDIA H200 NVL", "h200-nvl"), ("NVIDIA GH200 480GB", "gh200-96gb"),
    ("NVIDIA GH200 144G HBM3e", "gh200-144gb"),
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H100 80G HBM3", "h100-sxm"),  # the memory size in G, not GB, as in the GH200 144G's name
    ("NVIDIA B200", "b200"), ("NVIDIA GB200", "gb200"), ("NVIDIA B300 SXM6 AC", "b300"),
    ("NVIDIA A100-SXM4-40GB", "a100-sxm-40gb"), ("NVIDIA A100-PCIE-40GB", "a100-pcie-40gb"),
    ("NVIDIA A100 80GB PCIe", "a100-pcie-80gb"), ("NVIDIA A100-SXM4-80GB", "a100-sxm-80gb"),
    ("NVIDIA A10", "a10"),
])
def test_confusable_names_stay_apart(name, key):
    assert match(name).key == key


@pytest.mark.parametrize("name", [
    "NVIDIA GeForce RTX 4090 D",  # a cut-down 4090: not the 4090's peak
    "NVIDIA GeForce RTX 5080 Laptop GPU",
    "NVIDIA A10G",
    "NVIDIA GB300",  # not the B300
    "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition",
    "NVIDIA RTX 6000 Ada Generation",
    "AMD Instinct MI300X",
    "",
])
def test_names_no_row_accounts_for_are_unknown(name):
    assert match(name) is None


def test_l4_does_not_catch_l40s():
    # Lightning's substring match ("l4" in name) takes an L40S for an L4.
    assert match("NVIDIA L40S").tflops("bfloat16") == 362.05
    assert match("NVIDIA L4").tflops("bfloat16") == 121


def test_dense_figures_not_sparse():
    assert BY_KEY["h100-sxm"].bf16 == 989.4  # 1979 in the datasheet is with sparsity
    assert BY_KEY["h200-sxm"].bf16 == 989.4
    assert BY_KEY["b200"].bf16 == 2250  # not 4500
    # GeForce: bf16 with fp32 accumulation at half the fp16-accumulate rate.
    assert BY_KEY["rtx-4090"].bf16 == 165.2  # not 330
    assert BY_KEY["rtx-5090"].bf16 == 209.5


@pytest.mark.parametrize("gpu", GPUS, ids=lambda g: g.key)
def test_rows_are_consistent(gpu):
    assert gpu.source and gpu.names and gpu.fp32 > 0 and gpu.memory_gb > 0 and gpu.bandwidth_tbs > 0
    assert gpu.bf16 in (None, gpu.fp16)
    assert gpu.tf32 is None or gpu.tf32 <= gpu.fp16
    assert gpu.fp8 is None or gpu.fp8 >= gpu.fp16
    # SMs x per-SM rate x clock is the 16-bit peak: the clock it implies is a real GPU clock.
    if gpu.sms:
        assert 1300 <= gpu.rated_mhz <= 2700, gpu.rated_mhz
    assert math.log2(gpu.tensor_rate).is_integer()


def test_keys_and_names_are_unique():
    assert len({g.key for g in GPUS}) == len(GPUS)
    names = [n for g in GPUS for n in g.names]
    assert len(set(names)) == len(names)


def test_table_covers_the_required_gpus():
    for name in ["Tesla V100-SXM2-32GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A10", "NVIDIA L4", "NVIDIA L40S",
                 "NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA B200", "NVIDIA GB200",
                 "NVIDIA B300 SXM6 AC", "NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090",
                 "NVIDIA GeForce RTX 5080", "NVIDIA GeForce RTX 5090",
                 "NVIDIA RTX PRO 6000 Blackwell Workstation Edition"]:
        assert match(name) is not None, name


def test_find_takes_keys_names_and_short_names():
    assert find("h100").key == "h100-sxm"
    assert find("rtx4090").key == "rtx-4090"
    assert find("H100 NVL").key == "h100-nvl"
    assert find("a100") is None  # four A100s: the user must say which


def test_peak_for_known_gpu_and_dtypes():
    peak = peak_for("NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert peak.tflops == 989.4 and "H100 SXM" in peak.source and "datasheet" in peak.source
    assert peak_for("NVIDIA H100 80GB HBM3", "float32").tflops == 494.7  # TF32 tensor cores
    v100 = peak_for("Tesla V100-SXM2-16GB", "bfloat16")
    assert v100.tflops is None and "no bfloat16 tensor cores" in v100.source
    assert peak_for("Tesla V100-SXM2-16GB", "float16").tflops == 125
    with pytest.raises(ValueError, match="no tensor peak"):
        peak_for("NVIDIA H100 80GB HBM3", torch.int8)


def test_unknown_gpu_warns_and_has_no_peak_unless_given():
    with pytest.warns(UserWarning, match="not in bench/hardware.py's peak table: MFU is n/a"):
        peak = peak_for("NVIDIA Imaginary 9000", "bfloat16")
    assert peak.tflops is None and "--peak-tflops" in peak.source
    given = peak_for("NVIDIA Imaginary 9000", "bfloat16", override=500.0)
    assert given.tflops == 500.0 and "given" in given.source


def test_a_gpu_whose_sms_are_not_its_rows_has_no_peak_and_no_row():
    """An H100 PCIe (114 SMs) under a name that reads as the SXM's, or a MIG slice: a warning and
    no peak, and no row for its profile's name, rather than the SXM's 989.4 TFLOPS."""
    with pytest.warns(UserWarning, match="reports 114 SMs where the peak table's H100 SXM has 132"):
        peak = peak_for("NVIDIA H100 80GB HBM2e", "bfloat16", sms=114)
    assert peak.tflops is None and "--peak-tflops" in peak.source
    assert peak_for("NVIDIA H100 80GB HBM3", "bfloat16", sms=132).tflops == 989.4
    device = hardware.Device(0, "NVIDIA H100 80GB HBM2e", 114, 79.6, (9, 0))
    assert device.gpu is None and device.slug == "nvidia-h100-80gb-hbm2e"
    assert hardware.Device(0, "NVIDIA H100 80GB HBM3", 132, 79.6, (9, 0)).slug == "h100-sxm"
    with pytest.warns(UserWarning, match="is a MIG slice") as caught:
        assert peak_for("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bfloat16", sms=16).tflops is None
    assert "add a row" not in str(caught[0].message)


def test_peak_at_the_measured_clock():
    peak = peak_for("NVIDIA H100 80GB HBM3", "bfloat16")
    assert peak.at_clock(peak.gpu.rated_mhz) == pytest.approx(989.4)
    # 132 SMs x 4096 FLOPs/clock at 1980 MHz (NVML's max boost) is above the datasheet figure.
    assert peak.at_clock(1980) == pytest.approx(132 * 4096 * 1980e6 / 1e12, rel=1e-3)
    assert peak.at_clock(None) is None
    assert peak_for("x", "bfloat16", override=100).at_clock(1500) is None  # no clock behind it
    # A row whose product's SMs are unpublished takes the device's own count.
    assert peak_for("NVIDIA B300 SXM6 AC", "bfloat16").at_clock(1800) is None
    b300 = peak_for("NVIDIA B300 SXM6 AC", "bfloat16", sms=148)
    assert b300.at_clock(b300.gpu.rated_mhz_with(148)) == pytest.approx(2250)
    assert b300.at_clock(1800) == pytest.approx(148 * 8192 * 1800e6 / 1e12)
    tf32 = peak_for("NVIDIA H100 80GB HBM3", "float32")  # the clock scales every format's figure alike
    assert tf32.at_clock(1980) == pytest.approx(494.7 * 1980 / tf32.gpu.rated_mhz)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_no_gpu_detected_and_no_clocks_on_cpu():
    assert hardware.detect() is None
    with ClockSampler() as clocks:
        pass
    assert not clocks.available and clocks.stats() is None


def test_clocks_are_sampled_where_nvml_reports_no_power(monkeypatch):
    """Some GPUs and drivers answer the clock query but not the power one: the clock samples
    (and MFU at the clock) must not be lost with it."""
    import sys
    import time
    import types

    class NVMLError(Exception):
        pass

    def no_power(handle):
        raise NVMLError("Not Supported")

    fake = types.SimpleNamespace(NVMLError=NVMLError, NVML_CLOCK_SM=1, nvmlDeviceGetPowerUsage=no_power,
                                 nvmlDeviceGetClockInfo=lambda handle, clock: 1500)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = ClockSampler(interval_s=0.001)
    sampler._handle = object()  # as if NVML had found the GPU
    with sampler:
        deadline = time.monotonic() + 5
        while sampler.stats() is None and time.monotonic() < deadline:
            time.sleep(0.001)
    stats = sampler.stats()
    assert stats is not None and stats.sm_mhz == 1500 and stats.power_w is None


@pytest.mark.parametrize("word", ["nvidia", "geforce", "tesla", "gpu", "sxm", "sxm2", "sxm4", "sxm5", "sxm6",
                                  "hbm2", "hbm2e", "hbm3", "hbm3e", "ac", "edition", "workstation", "server",
                                  "80gb", "144g"])
def test_vendor_words_memory_sizes_and_revisions_do_not_stop_a_match(word):
    """Each word a device name may carry beyond its row's, named here (not read from the table's
    own list, which a word dropped from would drop from the test too)."""
    assert match(f"NVIDIA L4 {word}").key == "l4"
    assert match(f"NVIDIA L4 {word} laptop") is None  # a word outside the list still does


def test_names_split_on_any_separator_and_only_whole_sizes_are_filler():
    assert match("NVIDIA_H100_PCIe").key == "h100-pcie" and match("NVIDIA/L40S").key == "l40s"
    assert match("NVIDIA H100 80GB HBM3 1g.10gb") is None  # a MIG profile, not a memory size


def test_a_devices_dict_keeps_its_memory_to_two_decimals():
    assert Device(0, "NVIDIA H100 80GB HBM3", 132, 81559 / 1024, (9, 0)).as_dict()["memory_gib"] == 79.65


def test_an_unknown_devices_slug_is_file_safe():
    device = Device(0, "NVIDIA Imaginary  9000 (Rev. B)", 10, 8.0, (9, 0))
    assert device.gpu is None and device.slug == "nvidia-imaginary-9000-rev-b"
