"""Kernel profiles (profiles/<gpu-slug>.json, written by `python -m bench.kernels`) and the two
rules `kernels.choose` picks backends by: the fastest verified backend of a profile, and the
start-up self-check of a Triton op against torch at the run's shapes.

A profile holds one GPU's measurements at one or more workloads (a model's training shapes:
gpt2's and llama's are not alike: RoPE fused into attention against learned positions, rms norm
against layer norm). Per workload and op: the pass a training step runs ("fwd+bwd", or "step"
for the optimizer), and per measured backend ("torch", "compile" = torch.compile of the torch
backend, "triton") its median ms and rate per pass, its fraction of the roofline measured in the
same run, and whether it passed the check against the torch reference at those shapes. A run
takes each op from the workload nearest its own shapes (distance). profiles/README.md describes
the format.
"""
import functools
import hashlib
import json
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import kernels
from bench.cases import Shapes, check_cases, margin, out_of_memory
from gpt.model import GPTConfig, preset
from kernels import runtime
from kernels.checks import dtype_name

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
FORMAT = 2
# In a compiled model Inductor compiles the torch backend's ops with the rest of the graph:
# their time there is the "compile" measurement. A Triton op is opaque to it (a custom op).
COMPILED_AS = {"torch": "compile"}
# The optimizer's ops run outside the compiled model in train.py: no torch.compile variant, and
# eager launches whatever the model's mode.
OUTSIDE_GRAPH = {"adamw", "grad_norm"}


def launched_compiled(op: str, compiled: bool) -> bool:
    """Whether `op` runs inside a compiled model's graph (`compiled`): the optimizer's ops never do."""
    return compiled and op not in OUTSIDE_GRAPH


@dataclass(frozen=True)
class Profile:
    name: str  # where it came from, for the reasons shown to users
    data: dict

    @property
    def workloads(self) -> list[dict]:
        """One record a measured workload: its workload, device, versions, rooflines and ops."""
        return self.data["workloads"]

    def nearest(self, op: str, shapes: Shapes) -> dict | None:
        """The workload record that timed `op` nearest to `shapes` (see distance), None if none
        did (a record whose every backend failed there has no timing to choose by)."""
        timed = (w for w in self.workloads if any("ms" in r for r in w["ops"].get(op, {}).get("backends", {}).values()))
        return min(timed, key=lambda w: distance(op, w["workload"], shapes), default=None)

    def label(self, record: dict) -> str:
        """The file and what the record measured, for the reasons shown: its shapes need not be the run's."""
        w = record["workload"]
        return (f"{self.name} ({w['preset']} {w['dtype']} {w['batch_size']}x{w['seq_len']}, "
                f"torch {record.get('torch', '?')}{', stale' if self.stale(record) else ''})")

    @staticmethod
    def stale(record: dict) -> bool:
        """Whether `record` timed kernels other than these (or does not say which it timed)."""
        return record.get("kernels_source") != kernels_source()


# The modules whose code a profile times: the ops' kernels and launchers (not the registry, the
# selection or the argument checks).
TIMED_SOURCES = ("adamw", "attention", "cross_entropy", "norm", "packed", "rope", "runtime", "swiglu")


@functools.cache
def kernels_source() -> str:
    """A fingerprint of the timed kernel modules' sources: a record measured with other sources
    timed other code, and says so (Profile.stale)."""
    digest = hashlib.sha256()
    for name in TIMED_SOURCES:
        digest.update(name.encode() + b"\0" + (Path(kernels.__file__).parent / f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


def workload(preset_name: str, shapes: Shapes) -> dict:
    """What a profile records of the shapes it measured: enough to rebuild them (distance does)."""
    return {"preset": preset_name, "batch_size": shapes.batch_size, "seq_len": shapes.T,
            "dtype": dtype_name(shapes.dtype), "shapes": shapes.describe(),
            "config": asdict(shapes.config)}


def distance(op: str, measured: dict, shapes: Shapes) -> tuple:
    """How far a recorded workload is from `shapes` for `op`, for ordering: another dtype first,
    then how many of the kinds of kernel the op runs differ (see _aspects), then the summed |log
    ratio| of the sizes its speed depends on. Only the op's own: the vocabulary says nothing of
    attention's speed, and dropout nothing of the loss's. Last, a tie goes to a record of the
    run's own model."""
    m = GPTConfig(**measured["config"])
    (kinds, sizes), (run_kinds, run_sizes) = (_aspects(op, m, measured["batch_size"], measured["seq_len"]),
                                              _aspects(op, shapes.config, shapes.batch_size, shapes.T))
    return (measured["dtype"] != dtype_name(shapes.dtype),
            sum(a != b for a, b in zip(kinds, run_kinds)),
            sum(abs(math.log(a / b)) for a, b in zip(sizes, run_sizes)),
            m != shapes.config)


def _aspects(op: str, c: GPTConfig, batch_size: int, T: int) -> tuple[tuple, tuple]:
    """(kinds, sizes) of `op` in a model of `c` at micro-batch x T: the switches that make it run
    another kernel (dropout's mask; RoPE, fused into attention), and the sizes its work scales with."""
    tokens = batch_size * T
    if op == "attention":
        return ((bool(c.dropout), c.pos_encoding == "rope"),
                (c.head_dim, c.n_head, c.n_head // c.n_kv_head, T, tokens))
    if op in ("layer_norm", "rms_norm"):  # with dropout, the residual form's mask
        return (bool(c.dropout),), (c.n_embd, tokens)
    if op == "swiglu":
        return (), (c.mlp_hidden, tokens)
    if op == "rope":
        return (), (c.head_dim, c.n_head, T, tokens)
    if op in ("cross_entropy", "linear_cross_entropy"):
        return (), (c.n_embd, c.vocab_size, tokens)
    if op in OUTSIDE_GRAPH:  # the optimizer's: every parameter, whatever the batch
        return (), (c.n_layer, c.n_embd, c.mlp_hidden, c.vocab_size)
    raise ValueError(f"bench.profile: no aspects of op {op!r} to compare workloads by")


def path_for(slug: str) -> Path:
    return PROFILES / f"{slug}.json"


def load(path: Path) -> Profile | None:
    """The profile at `path`, None if there is none; a ValueError if it is not one."""
    path = Path(path)
    if not path.exists():
        return None
    rerun = "rerun python -m bench.kernels, or delete it"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); {rerun}") from None
    if not (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("workloads"), list)
            and data["workloads"] and all(isinstance(w, dict) for w in data["workloads"])):
        raise ValueError(f"{path}: not a format-{FORMAT} kernel profile; {rerun}")
    for i, record in enumerate(data["workloads"]):
        _check_record(record, f"{path}: workloads[{i}]", rerun)
    try:
        shown = path.resolve().relative_to(PROFILES.parent)
    except ValueError:
        shown = path
    return Profile(str(shown), data)


def _check_record(record: dict, where: str, rerun: str) -> None:
    measured = record.get("workload")
    try:
        config = GPTConfig(**measured["config"])
        if not all(isinstance(measured[k], int) and measured[k] > 0 for k in ("batch_size", "seq_len")):
            raise ValueError("batch_size and seq_len must be positive integers")
        if not isinstance(record.get("device", {}).get("slug"), str) or not all(
                isinstance(measured[k], str) for k in ("dtype", "preset")):
            raise ValueError("no device slug, dtype or preset")
        for op in kernels.OPS:  # the sizes nearness compares are numbers
            distance(op, measured, Shapes(config, batch_size=1))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: its workload or device is not readable ({type(e).__name__}: {e}); "
                         f"{rerun}") from None
    if not isinstance(record.get("ops"), dict):
        raise ValueError(f"{where}: no ops; {rerun}")
    for op, entry in record["ops"].items():
        backends = entry.get("backends") if isinstance(entry, dict) else None
        if not (isinstance(backends, dict) and isinstance(entry.get("training_pass"), str)
                and all(isinstance(r, dict) for r in backends.values())
                and all(_timing(r.get("ms"), entry["training_pass"]) for r in backends.values() if "ms" in r)
                and all(r.get("host_ms") is None or _timing(r["host_ms"], entry["training_pass"], missing=True)
                        for r in backends.values())
                and all(isinstance(r.get("verified", False), bool) for r in backends.values())):
            raise ValueError(f"{where}: ops.{op} lacks its training_pass, backends or their timings (ms a pass, "
                             f"verified true or false); {rerun}")


def _timing(times, pass_: str, missing: bool = False) -> bool:
    """Whether `times` maps passes to ms, `pass_` among them (unless `missing` may leave it out):
    finite positive numbers (a host time may be null: not measured)."""
    if not isinstance(times, dict) or (pass_ not in times and not missing):
        return False
    return all(t is None and missing or isinstance(t, (int, float)) and not isinstance(t, bool)
               and math.isfinite(t) and t > 0 for t in times.values())


def for_this_gpu() -> Profile | None:
    """This GPU's profile (profiles/<slug>.json), if any; a ValueError if that file holds another
    GPU's measurements (copied or renamed there: their choices would be that GPU's)."""
    from bench.hardware import detect

    device = detect(torch.cuda.current_device()) if torch.cuda.is_available() else None
    return load_own(path_for(device.slug), device.slug, "rerun python -m bench.kernels here") if device else None


def load_own(path: Path, slug: str, remedy: str = "pass another --out") -> Profile | None:
    """The profile at `path` (if any), whose measurements must all be of GPU `slug` (a measurement
    of it may join them); a ValueError saying `remedy` if it holds another GPU's."""
    old = load(path)
    others = {w["device"]["slug"] for w in old.workloads} - {slug} if old else set()
    if others:
        raise ValueError(f"{path} holds measurements of {', '.join(sorted(others))}, not of this GPU ({slug}): "
                         f"{remedy}")
    return old


def merged(path: Path, record: dict) -> dict:
    """The profile at `path` (if any) with `record` (one workload's measurement) added, in place
    of an earlier record of the same workload; a ValueError if the file is another GPU's."""
    old = load_own(path, record["device"]["slug"])
    kept = [w for w in old.workloads if w["workload"] != record["workload"]] if old else []
    return {"format": FORMAT, "workloads": [*kept, record]}


def fastest_verified(entry: dict, candidates: list[str], compiled: bool, generation: bool = False
                     ) -> tuple[str | None, str]:
    """(backend, why): the fastest of `candidates` (registry backends) in one op's profile entry
    at its training pass (in `generation`, the forward: nothing runs backward there) that passed
    verification there. Eagerly a pass costs the longer of the GPU's time and the host's time to
    issue it (a step whose host falls behind leaves the GPU waiting: the triton ops' eager GPT-2
    step on an H200 kept it busy 57% of the time); in a compiled model (`compiled`:
    launched_compiled's) Inductor's own code launches the kernels, and the GPU's time counts.
    torch, the reference, is eligible eagerly whatever its check; in a compiled model its
    compiled timing counts only where Inductor's result passed. A faster backend that failed
    verification is named in the reason, never chosen; where every measured one failed, torch.
    None when the entry measured none of the candidates."""
    pass_ = "fwd" if generation and entry["training_pass"] == "fwd+bwd" else entry["training_pass"]
    timed = {}
    for backend in candidates:
        measured = COMPILED_AS.get(backend, backend) if compiled else backend
        if pass_ not in entry["backends"].get(measured, {}).get("ms", {}):  # no compiled timing: eager's bounds it
            measured = backend
        record = entry["backends"].get(measured, {})
        if pass_ in record.get("ms", {}):
            reference = backend == "torch" and measured == "torch"
            ms = record["ms"][pass_]
            if not compiled:  # run eagerly, a pass costs its host's time where that is longer
                ms = max(ms, (record.get("host_ms") or {}).get(pass_) or 0.0)
            timed[backend] = (ms, measured, record.get("verified") is True or reference)
    eligible = {b: t for b, t in timed.items() if t[2]}
    if not timed:
        return None, "no measured backend in the profile"
    if not eligible:
        failed = ", ".join(f"{t[1]} {t[0]:.3g} ms" for t in timed.values())
        return "torch", f"nothing measured at {pass_} passed verification ({failed}): torch, the reference"
    best = min(eligible, key=lambda b: eligible[b][0])
    ms, measured, _ = eligible[best]
    others = ", ".join(f"{t[1]} {t[0]:.3g} ms" for b, t in eligible.items() if b != best)
    why = f"fastest verified at {pass_}: {measured} {ms:.3g} ms" + (f" vs {others}" if others else "")
    rejected = [f"{t[1]} {t[0]:.3g} ms" for b, t in timed.items() if not t[2] and t[0] < ms]
    if rejected:
        why += f" ({', '.join(rejected)} faster but failed verification)"
    return best, why


def default_shapes(device_type: str) -> Shapes:
    """Shapes for a self-check when the caller gave none: GPT-2 124M, one sequence."""
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    return Shapes(GPTConfig(**preset("gpt2")), batch_size=1, dtype=dtype)


CHECK_SEQ_LEN = 4096  # a longer T only adds tiles the attention kernel runs alike


def check_shapes(op: str, shapes: Shapes, device_type: str) -> Shapes:
    """What the self-check of `op` runs: the model's widths and sequence length (at most
    CHECK_SEQ_LEN) with one sequence on a GPU (the batch only sizes the grid), a tiny model of the
    same kind in the CPU interpreter. Attention on a GPU takes one key/value head and its group of
    query heads (Shapes.one_kv_group): the float64 reference's scores are H·T² doubles, kept for
    its backward with their gradients (4.3 GB each for 32 heads at 4096, more than a small GPU
    spares beside the model), and the launches differ only in their grids."""
    if device_type != "cuda":
        return shapes.tiny()
    checked = Shapes(shapes.config, batch_size=1, seq_len=min(shapes.T, CHECK_SEQ_LEN), dtype=shapes.dtype)
    return checked.one_kv_group() if op == "attention" else checked


_checked: dict[tuple, tuple[bool, str]] = {}
_checking = threading.Lock()  # one check at a time: two threads choosing at once check an op once


def self_check(op: str, shapes: Shapes, device_type: str, backend: str = "triton") -> tuple[bool, str]:
    """Whether `op`'s `backend` matches torch at `shapes` (see check_shapes), and why; once per
    op, backend and shapes in a process. The check draws its inputs and dropout seeds from a
    generator of its own: torch's are neither read nor moved (a run seeded before it, gpt.sample's
    --seed, samples as it would without it; a thread drawing from them meanwhile draws as it
    would, and cannot change the check's masks). Its backward runs whatever the caller's grad
    mode (a script choosing its kernels under no_grad or inference_mode). A check that ran out of
    memory fails and is not kept: the next choice in the process (memory freed) checks again."""
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{op}: a self-check on the GPU, and this machine has no CUDA GPU")
    shapes = check_shapes(op, shapes, device_type)
    key = (op, backend, device_type, shapes.key())
    with _checking:
        if key not in _checked:
            with (runtime.drawing_from(torch.Generator(device_type).manual_seed(0)),
                  torch.inference_mode(False), torch.enable_grad()):
                try:
                    _checked[key] = _check(op, shapes, device_type, backend)
                except torch.OutOfMemoryError as e:
                    return False, f"{shapes.describe()}: {out_of_memory(e)}"
        return _checked[key]


def _check(op: str, shapes: Shapes, device_type: str, backend: str) -> tuple[bool, str]:
    cases, worst = check_cases(op, shapes, device_type), 0.0  # the model's calls of it (a norm's forms)
    for c in cases:
        failure, fraction = margin(c, kernels.get(op, backend), kernels.get(op, "torch"))
        if failure is not None:
            return False, f"{shapes.describe()}: {failure}" + (f" ({c.shape})" if len(cases) > 1 else "")
        worst = max(worst, fraction)
    forms = f" in {len(cases)} forms" if len(cases) > 1 else ""
    return True, f"{shapes.describe()}: error at most {worst:.0%} of the bound{forms}"
