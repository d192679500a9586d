"""Choosing one backend per op for a model, once, before torch.compile.

Modes:
- "torch": the reference everywhere.
- "triton": Triton wherever it passes a self-check against torch at the run's shapes; an op
  that fails falls back to torch, with a warning and the failure as its reason (under "auto" too).
- "auto": on a GPU, per op the fastest backend that passed verification in this GPU's
  profile (profiles/<gpu>.json, from `python -m bench.kernels`) at the measured workload
  nearest the run's shapes, timed as the model will run it (compiled or eager; a warning when
  the profile timed other kernel sources); without a profile, Triton where it passes the
  self-check. On a CPU, torch: the Triton interpreter is for tests, not speed; on a GPU the
  triton backends refuse (runtime.unsupported_gpu: older than Ampere, or AMD's), torch too.
Whichever way Triton is picked, it has passed the self-check at this run's shapes. The
self-check and the profile rules live in bench/profile.py (imported on use: bench imports
this package).
"""
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from . import runtime
from .registry import OPS, get, ops

MODES = ("torch", "triton", "auto")
DETECT = "detect"  # profile=DETECT: the profile of the GPU this process runs on, if any


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


def _device_type(device) -> str:
    """"cuda" of "cuda", "cuda:1" or torch.device("cuda"), and the like (a device compared with
    "cuda" as given would be unequal, and so read as the CPU)."""
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"kernels: device_type must be a device such as 'cuda' or 'cpu', got {device!r}") from None


def check_request(kernels: str | Mapping[str, str]) -> None:
    """A ValueError unless `kernels` is a mode in MODES or an {op: backend} mapping of registered
    backends: what choose takes, checked before a run's set-up."""
    if isinstance(kernels, Mapping):
        unknown = set(kernels) - set(OPS)
        if unknown:
            raise ValueError(f"kernels: unknown ops {sorted(unknown)}; ops are {list(OPS)}")
        for op, backend in kernels.items():
            if not isinstance(backend, str):
                raise ValueError(f"kernels: {op}'s backend must be a name such as 'triton', got {backend!r}")
            get(op, backend)  # raises a ValueError naming the op if it is not registered
    elif kernels not in MODES:
        raise ValueError(f"kernels must be one of {MODES} or an op -> backend mapping, got {kernels!r}")


# auto is for speed: a TRITON_INTERPRET left set (a test setting) would run the kernels on the host.
# Asked for by name they still run so (Triton's way to debug a kernel on a GPU's tensors).
INTERPRETED_ON_A_GPU = ("TRITON_INTERPRET is set: the triton kernels would run in Triton's CPU interpreter, "
                        "not on the GPU (unset it to run them there)")


def choose(kernels: str | Mapping[str, str], device_type: str | torch.device, *, shapes=None, compiled: bool = False,
           profile=DETECT, used: Collection[str] | None = None, generation: bool = False) -> dict[str, Choice]:
    """op -> Choice for `kernels`: a mode in MODES, or an explicit {op: backend} mapping (ops it
    leaves out use torch; a backend other than torch asked for that fails its self-check is
    refused with a ValueError: asked for, it does not fall back).

    device_type: "cuda", "cpu", ... (a device's index is not used: the self-checks run on, and
      the profile is that of, the current CUDA device, which train.py sets to its `device`).
    shapes: a bench.cases.Shapes of the run (model config, micro-batch, dtype) for the
      self-check; without it the check runs at GPT-2 124M's shapes.
    compiled: whether the model will run under torch.compile (profiles then time torch's ops
      as Inductor compiles them).
    profile: DETECT, a bench.profile.Profile, a path to one, or None for no profile.
    used: the ops the run calls (gpt.model.model_ops, and the optimizer's), or None for all.
      The others are left to torch unchecked, and say so.
    generation: the model only runs forward (gpt.sample): profiles' forward timings count.
    """
    device_type = _device_type(device_type)
    if isinstance(used, str):  # `op in "linear_cross_entropy"` would match "cross_entropy"
        raise ValueError(f"kernels: used must be a collection of op names, got the string {used!r}")
    check_request(kernels)
    if isinstance(kernels, Mapping):
        return _asked(kernels, device_type, shapes, used)
    if kernels == "torch":
        return {op: Choice("torch", "asked for") for op in OPS}
    if kernels == "auto" and device_type != "cuda":
        return {op: Choice("torch", f"auto on {device_type}: the kernels run on CUDA GPUs (the CPU's "
                                    f"Triton interpreter is for tests, not speed)") for op in OPS}
    refused = kernels == "auto" and torch.cuda.is_available() and (
        runtime.unsupported_gpu(torch.device("cuda")) or (runtime.INTERPRET and INTERPRETED_ON_A_GPU))
    if refused:
        return {op: Choice("torch", f"auto: {refused}") for op in OPS}

    from bench import profile as profiles

    registered = ops()
    shapes = shapes or profiles.default_shapes(device_type)
    prof = _resolve(profile, profiles) if kernels == "auto" else None
    choices, stale = {}, False
    for op in OPS:
        if used is not None and op not in used:
            choices[op] = Choice("torch", "not used by this run")
            continue
        if "triton" not in registered[op]:
            choices[op] = Choice("torch", "no triton backend yet: falls back to torch")
            continue
        measured = prof.nearest(op, shapes) if prof is not None else None
        if measured is not None:
            stale = stale or prof.stale(measured)
            backend, why = profiles.fastest_verified(measured["ops"][op], registered[op],
                                                     profiles.launched_compiled(op, compiled), generation)
            if backend is not None and backend != "triton":
                choices[op] = Choice(backend, f"{prof.label(measured)}: {why}")
                continue
            lead = f"{prof.label(measured)}: {why}" if backend else f"{prof.label(measured)} has no timing for it"
        elif prof is not None:
            lead = f"{prof.name} has no entry for {op}"
        elif kernels == "auto":
            lead = "no profile for this GPU (python -m bench.kernels writes one)"
        else:
            lead = "asked for"
        ok, check = profiles.self_check(op, shapes, device_type)
        if ok:
            choices[op] = Choice("triton", f"{lead}; self-check passed at {check}")
        else:
            choices[op] = Choice("torch", f"{lead}; triton failed its self-check at {check}: falls back to torch")
            warnings.warn(f"kernels={kernels}: {op} falls back to torch: {choices[op].reason}", stacklevel=2)
    if stale:
        warnings.warn(f"kernels=auto: {prof.name} timed other kernel sources than these (marked stale): its "
                      f"choices may not hold for them; python -m bench.kernels measures these", stacklevel=2)
    return choices


def _asked(kernels: Mapping[str, str], device_type: str, shapes, used: Collection[str] | None) -> dict[str, Choice]:
    """choose's choices for an {op: backend} mapping."""
    from bench import profile as profiles

    choices = {}
    for op in OPS:
        backend = kernels.get(op, "torch")
        if used is not None and op not in used:
            choices[op] = Choice("torch", "not used by this run" + (f" (asked for {backend})" if op in kernels else ""))
        elif op not in kernels:
            choices[op] = Choice("torch", "default")
        else:
            if backend != "torch":  # the run's shapes it cannot take, refused now, not at its first call
                ok, check = profiles.self_check(op, shapes or profiles.default_shapes(device_type), device_type,
                                                backend)
                if not ok:
                    hint = " (kernels=triton runs torch where triton fails)" if backend == "triton" else ""
                    raise ValueError(f"{op}: its {backend} backend, asked for, failed its self-check at {check}{hint}")
            choices[op] = Choice(backend, "asked for")
    return choices


def agreed(choices: dict[str, Choice], per_rank: list[dict[str, str]]) -> dict[str, Choice]:
    """`choices` with torch for every op on which the ranks' backends (op -> backend, one dict a
    rank) differ: replicas must compute alike, and a self-check near its bound, or out of memory
    on one GPU, could pass on one rank and fail on another."""
    result = dict(choices)
    for op in choices:
        backends = [rank[op] for rank in per_rank]
        if len(set(backends)) > 1:
            result[op] = Choice("torch", f"the ranks chose differently ({', '.join(backends)}): torch on every rank")
    return result


def _resolve(profile, profiles):
    if profile == DETECT:
        return profiles.for_this_gpu()
    if profile is None or isinstance(profile, profiles.Profile):
        return profile
    loaded = profiles.load(profile)
    if loaded is None:
        raise ValueError(f"kernels: no profile at {profile}")
    return loaded
