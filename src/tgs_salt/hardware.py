"""The machine a run lands on: device choice, and the precision / memory layout to train with.

``train.amp`` and ``train.channels_last`` accept ``auto`` (the shipped default), ``true`` or ``false``:

* CUDA: autocast in bf16 where the GPU runs it natively (compute capability 8.0+, Ampere and
  later), otherwise fp16 with a GradScaler (P100, V100, T4: their bf16 kernels are slow
  fallbacks); channels_last with autocast (tensor cores want NHWC).
* CPU: a short probe times one training step of the real model and batch for fp32 / bf16 ×
  NCHW / channels_last and keeps the fastest. bf16 is about 2.5x faster than fp32 on CPUs with
  native bf16 (avx512_bf16, amx_bf16) and about 11x slower where it is emulated (AVX2 only), so
  nothing is assumed: a bf16 candidate is first timed on a few images and dropped at once when
  it is far behind.

The choice and the measured rates go to ``<run dir>/precision.json``; resume, the other folds
and ``predict`` reuse it on the same kind of device (resume on another kind of CPU probes again;
``predict`` drops a reduced precision this device would emulate: :func:`for_inference`). An explicit
``true``/``false`` is obeyed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from tgs_salt.errors import UserError
from tgs_salt.models import split_output

log = logging.getLogger(__name__)
AUTO = "auto"


# ----------------------------------------------------------------------------- CPU and GPU facts

def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_flags(limit: str | None = None) -> set[str]:
    """The CPU's flags as the convolutions see them: those of ``/proc/cpuinfo`` minus what
    ``ONEDNN_MAX_CPU_ISA`` (``limit``, default: read from the environment) keeps oneDNN from using."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return limited_flags(flags, isa_limit() if limit is None else limit)


# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) and the flags of note each one leaves out
_FP16 = {"avx512_fp16", "amx_fp16"}
_ISA_DROPS = {
    "sse41": {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"} | _FP16,
    "avx": {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"} | _FP16,
    "avx2": {"avx512f", "avx512_bf16", "amx_bf16"} | _FP16,
    "avx2_vnni": {"avx512f", "avx512_bf16", "amx_bf16"} | _FP16,
    "avx2_vnni_2": {"avx512f", "avx512_bf16", "amx_bf16"} | _FP16,
    "avx512_core": {"avx512_bf16", "amx_bf16"} | _FP16,
    "avx512_core_vnni": {"avx512_bf16", "amx_bf16"} | _FP16,
    "avx512_core_bf16": {"amx_bf16"} | _FP16,
    "avx512_core_fp16": {"amx_bf16", "amx_fp16"},
    "avx10_1_512": {"amx_bf16", "amx_fp16"},
}


def isa_limit() -> str:
    """The vector ISA oneDNN (the CPU convolutions) is limited to by ``ONEDNN_MAX_CPU_ISA`` (or its
    old name ``DNNL_MAX_CPU_ISA``), lower case; "" when not limited. Setting
    ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` makes a bigger CPU train like an
    AVX2-only one (bf16 emulated), which is how the AVX2 figures can be checked without one."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().lower()


def limited_flags(flags: set[str], limit: str) -> set[str]:
    return flags - _ISA_DROPS.get(limit.lower(), set())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether the convolutions run bf16 natively here (under an ISA limit, if any)."""
    flags = cpu_flags() if flags is None else limited_flags(flags, isa_limit())
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_kind(flags: set[str] | None = None) -> str:
    """A short label of the CPU's vector units, for logs and figures: "AVX2 only", "AMX bf16", ...;
    under an ISA limit that hides some of them (see :func:`isa_limit`), the label of what is left
    and how, e.g. "AVX2 only (ONEDNN_MAX_CPU_ISA=AVX2 on an AMX bf16 CPU)"."""
    limit = isa_limit()
    flags = cpu_flags("") if flags is None else flags
    kind = _kind(limited_flags(flags, limit))
    full = _kind(flags)
    return kind if kind == full else f"{kind} (ONEDNN_MAX_CPU_ISA={limit.upper()} on an {full} CPU)"


def kind_limit(kind: str) -> str:
    """The ISA limit a :func:`cpu_kind` label names ("AVX2" for "AVX2 only (ONEDNN_MAX_CPU_ISA=AVX2 on an
    AMX bf16 CPU)"), or "" when it names none: the one reading of that label, for labels written
    elsewhere (a run's ``precision.json``) or file names (bench result files)."""
    m = re.search(r"\(ONEDNN_MAX_CPU_ISA=(\w+) on an ", kind)
    return m.group(1).upper() if m else ""


def _kind(flags: set[str]) -> str:
    if "amx_bf16" in flags:
        return "AMX bf16"
    if "avx512_bf16" in flags:
        return "AVX-512 bf16"
    if "avx512f" in flags:
        return "AVX-512 (no bf16)"
    if "avx2" in flags:
        return "AVX2 only"
    return "no AVX2"


def nvidia_smi_gpus() -> list[str]:
    """GPU lines of ``nvidia-smi -L`` (empty when the tool is missing or lists nothing)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().startswith("GPU")]


CUDA_HELP = ("torch {torch} was built for CUDA {cuda} (GPU architectures: {archs}). Install a build that "
             "matches your GPU and driver: on Kaggle or Colab keep their preinstalled torch "
             "(TGS_TORCH=system ./run_all.sh), elsewhere TGS_TORCH=cu126 ./run_all.sh installs the CUDA 12.6 "
             "build (Pascal P100 to Hopper H100, driver >= 525); see README, 'GPUs'. Or run on the CPU "
             "with --device cpu")


def _cuda_help() -> str:
    archs = ", ".join(torch.cuda.get_arch_list()) or "none"
    return CUDA_HELP.format(torch=torch.__version__, cuda=torch.version.cuda, archs=archs)


def cuda_arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build with ``arch_list`` (e.g. ['sm_75', ..., 'compute_120']) runs on a GPU of
    ``capability``: a binary for the same major version and a lower or equal minor, or PTX to JIT from."""
    cap = capability[0] * 10 + capability[1]

    def num(a: str) -> int:
        return int(re.sub(r"\D", "", a.split("_", 1)[1]) or 0)

    sm = [num(a) for a in arch_list if a.startswith("sm_")]
    ptx = [num(a) for a in arch_list if a.startswith("compute_")]
    return not arch_list or any(s // 10 == capability[0] and s <= cap for s in sm) or any(p <= cap for p in ptx)


def check_cuda_usable(index: int = 0) -> None:
    """Raise when torch cannot run kernels on the GPU (its architecture is not in the build)."""
    cap = torch.cuda.get_device_capability(index)
    if not cuda_arch_supported(cap, torch.cuda.get_arch_list()):
        name = torch.cuda.get_device_name(index)
        raise UserError(f"GPU {index} ({name}, compute capability {cap[0]}.{cap[1]}) is not supported by this "
                        f"torch: {_cuda_help()}")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when torch can use a GPU; it fails loudly when GPUs exist that torch cannot use."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device {name!r}: use auto, cpu or cuda")
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        check_cuda_usable(0 if name == "auto" else (torch.device(name).index or 0))
        return torch.device("cuda" if name == "auto" else name)
    gpus = nvidia_smi_gpus()
    if gpus:
        raise UserError(f"nvidia-smi lists {len(gpus)} GPU(s) ({gpus[0]}) but torch cannot use them "
                        f"(driver too old for this build, or no kernels for the GPU): {_cuda_help()}")
    if name == "auto":
        return torch.device("cpu")
    raise UserError("--device cuda asked for, but torch sees no CUDA device")


# ----------------------------------------------------------------------------- memory allocator

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a CPU training step frees for the next step: no trimming
    of the heap's top (``M_TRIM_THRESHOLD`` -1) and nothing served by ``mmap`` (``M_MMAP_MAX`` 0),
    so every tensor comes from the heap and goes back to it. By default glibc gives large blocks back
    to the kernel when they are freed (a block above the mmap threshold, at most 32 MiB, is unmapped;
    the heap's top is trimmed), and the next step's tensors land on fresh pages the kernel must
    zero-fill on first touch: 16,000-44,000 page faults per 112 px training step of ``cpu_budget``,
    about a tenth of the step on two AVX2 cores (``bench/bench_malloc.py``). Process-wide and for
    the process's life: what the process has once used stays mapped to it. True when set (Linux with
    glibc); False elsewhere, where nothing changes."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl's mallopt does nothing
            return False
        return bool(libc.mallopt(M_TRIM_THRESHOLD, -1)) and bool(libc.mallopt(M_MMAP_MAX, 0))
    except (OSError, AttributeError):
        return False


def apply_cpu_malloc(train_cfg: dict, device: torch.device) -> bool:
    """``train.cpu_malloc`` for this process: :func:`keep_freed_memory` on a CPU when it says keep.
    True when memory is now kept."""
    return device.type == "cpu" and train_cfg["cpu_malloc"] == "keep" and keep_freed_memory()


# ----------------------------------------------------------------------------- precision

@dataclass
class Precision:
    """How to run the model: autocast dtype (None = fp32) and memory layout."""

    dtype: str | None = None            # None (fp32) | "bfloat16" | "float16"
    channels_last: bool = False
    reason: str = ""
    rates: dict = field(default_factory=dict)   # candidate name -> measured training images/s

    @property
    def name(self) -> str:
        return candidate_name(self.dtype, self.channels_last)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, self.dtype))

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == "float16"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Precision:
        return cls(**{k: d[k] for k in ("dtype", "channels_last", "reason", "rates") if k in d})


def candidate_name(dtype: str | None, channels_last: bool) -> str:
    return f"{'fp32' if dtype is None else {'bfloat16': 'bf16', 'float16': 'fp16'}[dtype]}" \
           f"+{'channels_last' if channels_last else 'NCHW'}"


def _dtype_choices(amp, amp_dtype: str, device: torch.device, capability: tuple[int, int] | None) -> list:
    """Autocast dtypes allowed by the config (None = fp32)."""
    if amp is False:
        return [None]
    if device.type == "cuda":
        dtype = amp_dtype if amp_dtype != AUTO else (
            "bfloat16" if runs_natively("bfloat16", device, capability) else "float16")
        return [dtype]
    # CPU
    if amp_dtype == "float16":
        return [None, "float16"] if amp == AUTO else ["float16"]
    return [None, "bfloat16"] if amp == AUTO else ["bfloat16"]


def candidates(train_cfg: dict, device: torch.device,
               capability: tuple[int, int] | None = None) -> list[tuple[str | None, bool]]:
    """(dtype, channels_last) pairs the config allows, in the order they are tried."""
    dtypes = _dtype_choices(train_cfg["amp"], train_cfg["amp_dtype"], device, capability)
    cl = train_cfg["channels_last"]
    if cl == AUTO:
        layouts = [True] if device.type == "cuda" else [False, True]
    else:
        layouts = [bool(cl)]
    return [(d, c) for d in dtypes for c in layouts]


ONEDNN_1X1_NHWC_BUG = "https://github.com/uxlfoundation/oneDNN/issues/6035"


def channels_last_hazard(model: torch.nn.Module) -> str | None:
    """The first layer that channels_last training on a CPU cannot run safely, or None. oneDNN's 1x1
    convolution computes a strided layer's weight gradient out of bounds in NHWC when the layer has
    fewer input channels than the ISA's block (8 with AVX2, 16 with AVX-512): a crash, a hang or
    wrong weights (ONEDNN_1X1_NHWC_BUG). torch 2.14 on an AVX2 EPYC: ``Conv2d(3, 48, 1, stride=2)``
    segfaults in backward with 3 or 4 input channels, runs with 8 or 16 and in NCHW. smp's mobileone
    encoders start with one (their ``rbr_scale`` branch on the input); the ResNets have none."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1) and max(mod.stride) > 1 \
                and mod.groups == 1 and mod.in_channels < 16:
            return f"{name} ({mod.in_channels} -> {mod.out_channels} channels, 1x1, stride {mod.stride[0]})"
    return None


def channels_last_unsafe(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why ``model`` must not train in channels_last on ``device`` (a sentence for a log or an
    error), or None: a layer :func:`channels_last_hazard` finds, on a CPU (oneDNN) only."""
    hazard = channels_last_hazard(model) if device.type == "cpu" else None
    if hazard is None:
        return None
    return (f"the model's layer {hazard} trains wrongly in channels_last on a CPU (oneDNN's 1x1 convolution "
            f"with a stride and few input channels: a crash, a hang or wrong weights; {ONEDNN_1X1_NHWC_BUG})")


def safe_layouts(train_cfg: dict, model: torch.nn.Module, device: torch.device) -> dict:
    """``train_cfg`` with channels_last ruled out where :func:`channels_last_unsafe` says so
    (``auto`` then measures NCHW only, with a warning); ``true`` there is a user error."""
    if train_cfg["channels_last"] is False:
        return train_cfg
    why = channels_last_unsafe(model, device)
    if why is None:
        return train_cfg
    if train_cfg["channels_last"] is True:
        raise UserError(f"train.channels_last is true, but {why}: set train.channels_last: false (or auto)")
    log.warning("channels_last not measured: %s; NCHW only", why)
    return {**train_cfg, "channels_last": False}


def rule_based(train_cfg: dict, device: torch.device, capability: tuple[int, int] | None = None,
               flags: set[str] | None = None) -> Precision:
    """The choice without measuring: CUDA by compute capability; CPU bf16 only where native."""
    cands = candidates(train_cfg, device, capability)
    if len(cands) == 1:
        return Precision(*cands[0], reason="set in the config")
    if device.type == "cuda":
        return Precision(*cands[0], reason=f"CUDA compute capability {capability}")
    native = cpu_native_bf16(flags)
    pick = [c for c in cands if (c[0] is not None) == native] or cands
    return Precision(*pick[-1], reason=f"CPU rule ({cpu_kind(flags)}), not measured")


StepFn = Callable[[str | None, bool, int], float]


def probe_cpu(cands: list[tuple[str | None, bool]], time_step: StepFn, batch: int,
              small: int = 2, slow_factor: float = 2.0, rounds: int = 2, max_seconds: float = 60.0) -> dict[str, float]:
    """Training images/s of each candidate. ``time_step(dtype, channels_last, n)`` returns the
    seconds of one timed step on ``n`` images (after its own warm-up). A reduced-precision
    candidate is first timed on ``small`` images, like the fastest candidate so far, and dropped
    when it is ``slow_factor`` behind it (an emulated bf16 step on a full batch can take half a
    minute). A busy moment must not decide the whole run: before a candidate is dropped, both
    small steps are timed again, and the drop stands only if the gap does; and every candidate
    timed on the full batch is timed again in ``rounds`` more rounds, in alternating order, keeping
    its best rate (a neighbour's load only ever slows a step down: with another training run on the
    same 2 cores, one pass measured native bf16 NCHW at 3.1 img/s against 55 idle, and picked a
    layout twice as slow). The extra rounds stop once the probe has taken ``max_seconds``: on a
    machine that slow, they cost more than they can save."""
    t_start = time.perf_counter()
    rates: dict[str, float] = {}
    timed: list[str] = []  # timed on the full batch
    by_name = {candidate_name(*c): c for c in cands}
    for dtype, cl in sorted(cands, key=lambda c: c[0] is not None):  # fp32 first: the reference
        name = candidate_name(dtype, cl)
        if dtype is not None and rates:
            best = by_name[max(rates, key=rates.get)]
            quick = small / time_step(dtype, cl, small)
            ref = small / time_step(*best, small)
            if quick * slow_factor < ref:  # confirm: the faster of two timings of each
                quick = max(quick, small / time_step(dtype, cl, small))
                ref = max(ref, small / time_step(*best, small))
            if quick * slow_factor < ref:
                rates[name] = round(quick, 2)
                log.info("precision probe: %s %.1f img/s on %d images against %.1f for %s: far behind, dropped",
                         name, quick, small, ref, candidate_name(*best))
                continue
        rates[name] = round(batch / time_step(dtype, cl, batch), 2)
        log.info("precision probe: %s %.1f img/s", name, rates[name])
        timed.append(name)
    done = 0
    for r in range(rounds if len(timed) > 1 else 0):
        if time.perf_counter() - t_start > max_seconds:
            log.info("precision probe: %.0f s spent, no more rounds", time.perf_counter() - t_start)
            break
        for name in (reversed(timed) if r % 2 == 0 else timed):
            rates[name] = max(rates[name], round(batch / time_step(*by_name[name], batch), 2))
        done += 1
    if done:
        log.info("precision probe, best of %d rounds: %s", done + 1, ", ".join(f"{n} {rates[n]:.1f}" for n in timed))
    return rates


def make_train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, crop,
                    precision: Precision, device: torch.device):
    """One training step (forward in ``precision``, the loss on the cropped mask logits, backward,
    AdamW) of a copy of ``model`` on the fixed batch ``x``, ``y``: what the probe and the benchmarks time."""
    m = copy.deepcopy(model).to(device=device, memory_format=precision.memory_format).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
    xb = x.contiguous(memory_format=precision.memory_format)

    def step():
        with precision.autocast(device):
            out = m(xb)
        loss = loss_fn(crop(split_output(out)[0]).float(), y)  # a classifier's logit costs nothing here
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


TIMING_SECONDS = 1.5  # a probe timing runs its steps this long (2-5 steps); shorter under a short budget


def make_step_timer(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, crop,
                    device: torch.device, steps: int = 2, min_seconds: float = TIMING_SECONDS) -> StepFn:
    """A ``time_step`` for :func:`probe_cpu` on a copy of the real model and a real batch (one copy
    per candidate and batch size, kept for the probe's later rounds)."""
    prepared: dict[tuple, object] = {}

    def prepare(dtype: str | None, channels_last: bool, n: int):
        step = make_train_step(model, x[:n], y[:n], loss_fn, crop, Precision(dtype, channels_last), device)
        step()  # warm-up: oneDNN / cuDNN primitive creation
        _sync(device)
        return step

    def time_step(dtype: str | None, channels_last: bool, n: int) -> float:
        key = (dtype, channels_last, n)
        if key not in prepared:
            prepared[key] = prepare(dtype, channels_last, n)
        step = prepared[key]
        times = []
        t_end = time.perf_counter() + min_seconds
        while len(times) < steps or (time.perf_counter() < t_end and len(times) < 5):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    return time_step


def time_inference(model: torch.nn.Module, x: torch.Tensor, precision: Precision, device: torch.device) -> float:
    """Inference images/s (one forward, no TTA) of ``model`` on batch ``x``."""
    m = copy.deepcopy(model).to(device=device, memory_format=precision.memory_format).eval()
    xb = x.contiguous(memory_format=precision.memory_format)
    with torch.inference_mode(), precision.autocast(device):
        m(xb)
        _sync(device)
        t0 = time.perf_counter()
        m(xb)
        _sync(device)
    return len(xb) / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose(train_cfg: dict, device: torch.device, time_step: StepFn | None, batch: int,
           capability: tuple[int, int] | None = None) -> Precision:
    """The precision to train with: measured on CPU when the config leaves a choice."""
    cands = candidates(train_cfg, device, capability)
    if device.type == "cuda" or len(cands) == 1 or time_step is None:
        return rule_based(train_cfg, device, capability)
    rates = probe_cpu(cands, time_step, batch)
    best = max(rates, key=rates.get)
    dtype, cl = next(c for c in cands if candidate_name(*c) == best)
    return Precision(dtype, cl, reason=f"fastest of {len(cands)} measured on this CPU ({cpu_kind()})",
                     rates=rates)


def runs_natively(dtype: str | None, device: torch.device, capability: tuple[int, int] | None = None,
                  flags: set[str] | None = None) -> bool:
    """Whether ``device`` runs autocast ``dtype`` (None: fp32) on its own units rather than emulating it:
    on CUDA bf16 from compute capability 8.0 (Ampere) and fp16 everywhere; on a CPU bf16 with
    avx512_bf16 / amx_bf16 and fp16 with avx512_fp16 / amx_fp16, under the ISA limit if any
    (``flags``: the CPU's, unlimited; default: this CPU's)."""
    if dtype is None:
        return True
    if device.type == "cuda":
        return dtype != "bfloat16" or (capability is not None and tuple(capability) >= (8, 0))
    if dtype == "bfloat16":
        return cpu_native_bf16(flags)
    have = cpu_flags() if flags is None else limited_flags(flags, isa_limit())
    return bool(_FP16 & have)


def for_inference(saved: dict | None, device: torch.device, capability: tuple[int, int] | None = None,
                  flags: set[str] | None = None) -> Precision:
    """The precision ``predict`` uses: the training run's choice (``saved``: its ``device_type``,
    ``precision`` and the config's ``amp``) on the same type of device, unless the run chose a reduced
    precision by itself (``amp: auto``) that this device would only emulate: bf16 picked on a native-bf16
    CPU, or on an Ampere GPU, and predicted on an AVX2-only CPU or a T4 (on the CPU ~11x slower than
    fp32). Otherwise the rule for this device (bf16 only where native; CUDA by compute capability)."""
    if device.type == "cuda" and capability is None:
        capability = torch.cuda.get_device_capability(device)
    prec = Precision.from_dict(saved["precision"]) if saved and saved.get("device_type") == device.type else None
    if prec and (saved.get("amp") is True or runs_natively(prec.dtype, device, capability, flags)):
        return prec
    rule = rule_based({"amp": AUTO, "amp_dtype": AUTO, "channels_last": AUTO}, device, capability, flags)
    return rule if prec is None else replace(rule, reason=f"{rule.reason}; the training run's {prec.name} would "
                                                          "be emulated here")
