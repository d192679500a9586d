"""GPU peak table, device detection and clock sampling: the denominators of MFU.

Every figure is a vendor figure, dense (no 2:4 sparsity), in TFLOPS, with fp32 accumulation
where the vendor gives two rates: training accumulates in fp32, and GeForce cards (and the L40)
run fp16/bf16 with fp32 accumulation at half their fp16-accumulate rate. Datasheets print
sparse figures; they are halved here (H100 SXM bf16: 1979 sparse -> 989.4 dense).

`tensor_rate` is the dense fp16/bf16 FLOPs per clock per SM (fp32 accumulation) of the row's
architecture, from its whitepaper. SMs x tensor_rate x clock is the bf16 peak, so the clock the
vendor's figure assumes follows from the row (`rated_mhz`), and a clock measured while training
gives the peak the GPU could have reached at that clock (`Peak.at_clock`): the vendor's clock
assumptions differ from the boost clocks NVML reports (H100 SXM: 989.4 TFLOPS is 1830 MHz;
NVML's maximum is 1980), so no NVML clock is used as the reference.

Names are matched by whole tokens of the reported device name, case-insensitively, so that L4 /
L40 / L40S, H200 / GH200 / H200 NVL and H100 SXM / PCIe / NVL never catch one another. A name
whose tokens do not all belong to one row (other than vendor words, memory sizes and SXM
revisions) is unknown: an RTX 4090 D or a laptop RTX 5080 is not an RTX 4090 or a desktop 5080.
"""
import re
import threading
import time
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPU:
    key: str  # slug: profiles/<key>.json
    name: str
    tokens: frozenset[str]  # every one must appear in the device name
    names: tuple[str, ...]  # device names torch / NVML report for it
    sms: int | None  # None where the product's SM count is not published
    tensor_rate: int  # dense fp16/bf16 FLOPs per clock per SM, fp32 accumulation
    bf16: float | None  # dense tensor TFLOPS; None: no such tensor-core format
    fp16: float | None
    tf32: float | None
    fp8: float | None
    fp32: float  # non-tensor
    memory_gb: float
    bandwidth_tbs: float
    source: str

    @property
    def rated_mhz(self) -> float | None:
        """The SM clock at which the vendor's 16-bit tensor figure is reached."""
        return self.rated_mhz_with(self.sms)

    def rated_mhz_with(self, sms: int | None) -> float | None:
        """The same for a device of `sms` SMs (a row whose product's count is unpublished)."""
        peak = self.bf16 or self.fp16
        return peak * 1e6 / (sms * self.tensor_rate) if sms else None

    def tflops(self, dtype: str) -> float | None:
        """Dense tensor peak for training in `dtype` (float32 trains through TF32 tensor cores,
        as train.py allows)."""
        return {"bfloat16": self.bf16, "float16": self.fp16, "float32": self.tf32}[peak_dtype(dtype)]


def _gpu(key, name, tokens, names, sms, tensor_rate, bf16, fp16, tf32, fp8, fp32, memory_gb,
         bandwidth_tbs, source) -> GPU:
    return GPU(key, name, frozenset(tokens.split()), tuple(names), sms, tensor_rate, bf16, fp16,
               tf32, fp8, fp32, memory_gb, bandwidth_tbs, source)


_V100 = "NVIDIA Tesla V100 datasheet; NVIDIA Tesla V100 (Volta) architecture whitepaper (no bf16/tf32/fp8)"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet; NVIDIA A100 (Ampere GA100) architecture whitepaper"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (sparse figures halved); NVIDIA H100 (Hopper) whitepaper"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet (sparse figures halved)"
_GH200 = "NVIDIA GH200 Grace Hopper Superchip datasheet (sparse figures halved)"
_RTX_BW = "NVIDIA RTX Blackwell GPU architecture whitepaper"

# Columns: key, name, tokens, reported names, SMs, tensor rate, bf16, fp16, tf32, fp8, fp32,
# memory GB, bandwidth TB/s, source.
GPUS: tuple[GPU, ...] = (
    _gpu("v100-sxm2-16gb", "V100 SXM2 16GB", "v100 16gb", ["Tesla V100-SXM2-16GB"],
         80, 1024, None, 125, None, None, 15.7, 16, 0.9, _V100),
    _gpu("v100-sxm2-32gb", "V100 SXM2 32GB", "v100 32gb", ["Tesla V100-SXM2-32GB"],
         80, 1024, None, 125, None, None, 15.7, 32, 0.9, _V100),
    _gpu("v100-pcie-16gb", "V100 PCIe 16GB", "v100 pcie 16gb", ["Tesla V100-PCIE-16GB"],
         80, 1024, None, 112, None, None, 14, 16, 0.9, _V100),
    _gpu("v100-pcie-32gb", "V100 PCIe 32GB", "v100 pcie 32gb", ["Tesla V100-PCIE-32GB"],
         80, 1024, None, 112, None, None, 14, 32, 0.9, _V100),
    _gpu("a100-sxm-40gb", "A100 SXM 40GB", "a100 40gb", ["NVIDIA A100-SXM4-40GB"],
         108, 2048, 312, 312, 156, None, 19.5, 40, 1.555, _A100),
    _gpu("a100-sxm-80gb", "A100 SXM 80GB", "a100 80gb", ["NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM-80GB"],
         108, 2048, 312, 312, 156, None, 19.5, 80, 2.039, _A100),
    _gpu("a100-pcie-40gb", "A100 PCIe 40GB", "a100 pcie 40gb", ["NVIDIA A100-PCIE-40GB"],
         108, 2048, 312, 312, 156, None, 19.5, 40, 1.555, _A100),
    _gpu("a100-pcie-80gb", "A100 PCIe 80GB", "a100 pcie 80gb", ["NVIDIA A100 80GB PCIe"],
         108, 2048, 312, 312, 156, None, 19.5, 80, 1.935, _A100),
    _gpu("a10", "A10", "a10", ["NVIDIA A10"],
         72, 1024, 125, 125, 62.5, None, 31.2, 24, 0.6, "NVIDIA A10 Tensor Core GPU datasheet"),
    _gpu("l4", "L4", "l4", ["NVIDIA L4"],
         58, 1024, 121, 121, 60, 242.5, 30.3, 24, 0.3, "NVIDIA L4 Tensor Core GPU datasheet (sparse halved)"),
    _gpu("l40", "L40", "l40", ["NVIDIA L40"],
         142, 512, 181.05, 181.05, 90.5, 362, 90.5, 48, 0.864, "NVIDIA L40 GPU datasheet (sparse halved)"),
    # (The datasheet's bf16 is 142 SMs at 2490 MHz, its tf32 and fp8 at 2520: kept as printed.)
    _gpu("l40s", "L40S", "l40s", ["NVIDIA L40S"],
         142, 1024, 362.05, 362.05, 183, 733, 91.6, 48, 0.864, "NVIDIA L40S GPU datasheet (sparse halved)"),
    _gpu("h100-sxm", "H100 SXM", "h100", ["NVIDIA H100 80GB HBM3"],
         132, 4096, 989.4, 989.4, 494.7, 1978.9, 66.9, 80, 3.35, _H100),
    _gpu("h100-pcie", "H100 PCIe", "h100 pcie", ["NVIDIA H100 PCIe"],
         114, 4096, 756.5, 756.5, 378, 1513, 51.2, 80, 2.0, _H100),
    _gpu("h100-nvl", "H100 NVL", "h100 nvl", ["NVIDIA H100 NVL"],
         132, 4096, 835.5, 835.5, 417.5, 1670.5, 60, 94, 3.9, _H100),
    _gpu("h200-sxm", "H200 SXM", "h200", ["NVIDIA H200"],
         132, 4096, 989.4, 989.4, 494.7, 1978.9, 67, 141, 4.8, _H200),
    _gpu("h200-nvl", "H200 NVL", "h200 nvl", ["NVIDIA H200 NVL"],
         132, 4096, 835.5, 835.5, 417.5, 1670.5, 60, 141, 4.8, _H200),
    _gpu("gh200-96gb", "GH200 96GB HBM3", "gh200", ["NVIDIA GH200 480GB"],
         132, 4096, 989.4, 989.4, 494.7, 1978.9, 67, 96, 4.0, _GH200),
    _gpu("gh200-144gb", "GH200 144GB HBM3e", "gh200 144g", ["NVIDIA GH200 144G HBM3e"],
         132, 4096, 989.4, 989.4, 494.7, 1978.9, 67, 144, 4.9, _GH200),
    _gpu("b200", "B200", "b200", ["NVIDIA B200"],
         148, 8192, 2250, 2250, 1125, 4500, 75, 180, 7.7,
         "NVIDIA HGX B200 datasheet, per GPU (8-GPU sparse totals / 8 / 2)"),
    _gpu("gb200", "GB200 (per GPU)", "gb200", ["NVIDIA GB200"],
         None, 8192, 2500, 2500, 1250, 5000, 80, 186, 8.0,
         "NVIDIA GB200 NVL72 datasheet, per GPU (sparse figures halved); SM count not published "
         "(B200's 148 or more: other sources disagree)"),
    _gpu("b300", "B300", "b300", ["NVIDIA B300 SXM6 AC"],
         None, 8192, 2250, 2250, 1125, 4500, 75, 288, 8.0,
         "NVIDIA HGX B300 datasheet, per GPU (8-GPU sparse totals / 8 / 2); SM count not published"),
    _gpu("rtx-3090", "GeForce RTX 3090", "rtx 3090", ["NVIDIA GeForce RTX 3090"],
         82, 512, 71, 71, 35.6, None, 35.6, 24, 0.936,
         "NVIDIA Ampere GA102 GPU architecture whitepaper (fp32-accumulate rates)"),
    _gpu("rtx-4090", "GeForce RTX 4090", "rtx 4090", ["NVIDIA GeForce RTX 4090"],
         128, 512, 165.2, 165.2, 82.6, 330.3, 82.6, 24, 1.008,
         "NVIDIA Ada Lovelace GPU architecture whitepaper (fp32-accumulate rates)"),
    _gpu("rtx-5080", "GeForce RTX 5080", "rtx 5080", ["NVIDIA GeForce RTX 5080"],
         84, 512, 112.6, 112.6, 56.3, 225.1, 56.3, 16, 0.96, _RTX_BW + " (fp32-accumulate rates)"),
    _gpu("rtx-5090", "GeForce RTX 5090", "rtx 5090", ["NVIDIA GeForce RTX 5090"],
         170, 512, 209.5, 209.5, 104.8, 419, 104.8, 32, 1.792, _RTX_BW + " (fp32-accumulate rates)"),
    _gpu("rtx-pro-6000-blackwell", "RTX PRO 6000 Blackwell", "rtx pro 6000 blackwell",
         ["NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "NVIDIA RTX PRO 6000 Blackwell Server Edition"],
         188, 1024, 503.8, 503.8, 251.9, 1007.6, 126, 96, 1.792,
         "NVIDIA RTX PRO 6000 Blackwell datasheet (4,000 FP4 sparse TOPS, 96 GB, 1,792 GB/s); "
         + _RTX_BW + " (2617 MHz boost); Max-Q edition not included"),
)

# Tokens a device name may carry beyond its row's: vendor words, SXM revisions and memory type.
_FILLER = {"nvidia", "geforce", "tesla", "gpu", "sxm", "sxm2", "sxm4", "sxm5", "sxm6", "hbm2",
           "hbm2e", "hbm3", "hbm3e", "ac", "edition", "workstation", "server"}
_MEMORY_SIZE = re.compile(r"\d+gb?")


def name_tokens(name: str) -> set[str]:
    return set(re.split(r"[\s\-_/]+", name.strip().lower())) - {""}


def _is_filler(token: str) -> bool:
    return token in _FILLER or _MEMORY_SIZE.fullmatch(token) is not None


def match(device_name: str) -> GPU | None:
    """The table row for a reported device name, or None when no row (or more than one equally
    specific row) accounts for all of its tokens."""
    words = name_tokens(device_name)
    fits = [g for g in GPUS if g.tokens <= words and all(_is_filler(w) for w in words - g.tokens)]
    if not fits:
        return None
    most = max(len(g.tokens) for g in fits)
    best = [g for g in fits if len(g.tokens) == most]
    return best[0] if len(best) == 1 else None


def sm_mismatch(gpu: GPU, sms: int | None) -> bool:
    """Whether a device that reports `sms` SMs cannot be the row's product: another one under a
    like name (an H100 PCIe, 114 SMs, called "H100 80GB HBM2e" by some clouds) or a MIG slice."""
    return bool(sms and gpu.sms and sms != gpu.sms)


def row_for(device_name: str, sms: int | None) -> GPU | None:
    """The row of a device by its reported name, unless its SMs say it is another product."""
    gpu = match(device_name)
    return None if gpu is None or sm_mismatch(gpu, sms) else gpu


def find(name: str) -> GPU | None:
    """A row by key, with or without its hyphens ("h100-sxm", "rtx4090"), or by device name
    ("H100", "NVIDIA L40S")."""
    squash = lambda s: re.sub(r"[^a-z0-9]", "", s.lower())  # noqa: E731
    by_key = {squash(g.key): g for g in GPUS}
    return by_key.get(squash(name)) or match(name)


def peak_dtype(dtype) -> str:
    """'bfloat16', 'float16' or 'float32' from a torch dtype or its name: a dtype with a tensor peak."""
    from kernels.checks import dtype_name  # on use: detect() (gpu_session.sh's slug) needs no Triton

    name = dtype_name(dtype)
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"no tensor peak for dtype {name!r}; use bfloat16, float16 or float32")
    return name


@dataclass(frozen=True)
class Peak:
    """The MFU denominator and where it came from; tflops None means MFU is n/a."""

    tflops: float | None
    source: str
    gpu: GPU | None = None
    sms: int | None = None  # the device's own count, for a row whose product's is unpublished

    def at_clock(self, sm_mhz: float | None) -> float | None:
        """The peak at a measured SM clock: the table's figure x clock / the clock it assumes
        (a --peak-tflops override carries no clock, so it has none)."""
        rated = self.gpu.rated_mhz_with(self.gpu.sms or self.sms) if self.gpu else None
        if self.tflops is None or not sm_mhz or not rated:
            return None
        return self.tflops * sm_mhz / rated


def peak_for(device_name: str, dtype, override: float | None = None, sms: int | None = None) -> Peak:
    """The dense tensor peak of `device_name` for `dtype`; `sms`, the SMs the device reports,
    where known. An override (--peak-tflops) wins; an unknown GPU, or one whose SMs are not its
    row's, warns and gives no peak rather than a borrowed one."""
    if override is not None:
        return Peak(override, f"--peak-tflops {override:g} (given)")
    gpu = row_for(device_name, sms)
    dtype = peak_dtype(dtype)
    if gpu is None:
        add_row, named = "", match(device_name)
        if named is not None:
            why = (f"reports {sms} SMs where the peak table's {named.name} has {named.sms} (another product "
                   f"under a like name, or a MIG slice)")
        elif "mig" in name_tokens(device_name):
            why = "is a MIG slice, with a share of its GPU's peak"
        else:
            why, add_row = "is not in bench/hardware.py's peak table", ", or add a row"
        give = "bench.mfu --peak-tflops, train.py --peak_tflops="
        warnings.warn(f"GPU {device_name!r} {why}: MFU is n/a. Give its dense {dtype} tensor TFLOPS "
                      f"({give}){add_row}.", stacklevel=2)
        return Peak(None, f"GPU {device_name!r} {why}: no peak (give {give})")
    tflops = gpu.tflops(dtype)
    if tflops is None:
        return Peak(None, f"{gpu.name} has no {dtype} tensor cores ({gpu.source})", gpu, sms)
    return Peak(tflops, f"{gpu.name} dense {dtype} {tflops:g} TFLOPS ({gpu.source})", gpu, sms)


# --- the GPU at hand ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    """What this machine reports about one CUDA device (NVML where it answers, else torch)."""

    index: int
    name: str
    sms: int
    memory_gib: float
    capability: tuple[int, int]
    driver: str | None = None
    power_limit_w: float | None = None
    max_sm_mhz: float | None = None

    @property
    def gpu(self) -> GPU | None:
        """Its peak-table row: the name's, unless the SMs say it is another product."""
        return row_for(self.name, self.sms)

    @property
    def slug(self) -> str:
        """profiles/<slug>.json: the table key, or the device name made file-safe."""
        return self.gpu.key if self.gpu else re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    def as_dict(self) -> dict:
        return dict(index=self.index, name=self.name, gpu=self.gpu.name if self.gpu else None,
                    slug=self.slug, sms=self.sms, memory_gib=round(self.memory_gib, 2),
                    capability=list(self.capability), driver=self.driver,
                    power_limit_w=self.power_limit_w, max_sm_mhz=self.max_sm_mhz)


def _nvml_handle(index: int):
    """NVML's handle for torch's device `index`, found by UUID so that CUDA_VISIBLE_DEVICES
    renumbering cannot pair torch's device with another GPU's clocks; None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
    except Exception:  # no driver library, no permission, an old torch without .uuid
        return None


def detect(index: int = 0) -> Device | None:
    """The CUDA device `index`, or None on a machine without one."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(index)
    device = Device(index, props.name, props.multi_processor_count, props.total_memory / 2**30,
                    (props.major, props.minor))
    handle = _nvml_handle(index)
    if handle is None:
        return device
    import pynvml

    def ask(query, *args):  # each query may be unsupported on this GPU or driver
        try:
            return query(*args)
        except pynvml.NVMLError:
            return None

    limit_mw = ask(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
    memory = ask(pynvml.nvmlDeviceGetMemoryInfo, handle)
    return Device(index, _text(ask(pynvml.nvmlDeviceGetName, handle) or props.name),
                  props.multi_processor_count, memory.total / 2**30 if memory else device.memory_gib,
                  device.capability, _text(ask(pynvml.nvmlSystemGetDriverVersion)),
                  limit_mw / 1000 if limit_mw else None,
                  ask(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM))


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class ClockStats:
    sm_mhz: float  # mean of the samples
    min_sm_mhz: float
    max_sm_mhz: float
    power_w: float | None  # None where NVML reports no power draw
    samples: int


class ClockSampler:
    """Samples the SM clock and power draw from NVML on a background thread, so that the clock
    the GPU ran at during timed steps is known without touching the CUDA stream.

        with ClockSampler(0) as clocks:
            ...  # timed steps
        clocks.stats()  # stats(clear=True) between log intervals
    """

    def __init__(self, index: int = 0, interval_s: float = 0.05):
        self._handle = _nvml_handle(index) if torch.cuda.is_available() else None
        self._interval = interval_s
        self._mhz: list[float] = []
        self._watts: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def start(self) -> "ClockSampler":
        if self.available and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="nvml-clock-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        import pynvml

        power = True  # some GPUs and drivers report no power draw: then the clock alone
        while not self._stop.is_set():
            try:
                mhz = pynvml.nvmlDeviceGetClockInfo(self._handle, pynvml.NVML_CLOCK_SM)
            except pynvml.NVMLError:
                return
            try:
                watts = pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000 if power else None
            except pynvml.NVMLError:
                power, watts = False, None
            with self._lock:
                self._mhz.append(mhz)
                if watts is not None:
                    self._watts.append(watts)
            time.sleep(self._interval)

    def stats(self, clear: bool = False) -> ClockStats | None:
        """Mean, min and max SM clock and mean power (None if unreported) of the samples so far
        (None before the first); `clear` starts the next interval afresh."""
        with self._lock:
            mhz, watts = list(self._mhz), list(self._watts)
            if clear:
                self._mhz.clear()
                self._watts.clear()
        if not mhz:
            return None
        return ClockStats(sum(mhz) / len(mhz), min(mhz), max(mhz), sum(watts) / len(watts) if watts else None,
                          len(mhz))
