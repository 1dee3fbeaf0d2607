"""Devices, precision and threads: decided here and nowhere else.

    resolve_device("auto")            cuda > mps > cpu
    resolve_dtype("auto", device)     the autocast dtype (None: plain fp32)
    matmul_dtype(device)              the dtype for the optimizer's own matrix products (Muon's Newton-Schulz)
    machine_info(device)              what a run records about the machine it ran on

Why precision is *measured* on CPUs: whether bf16 is fast depends on the silicon, not on what torch accepts.
With native bf16 dot products (x86 avx512_bf16 / AMX, e.g. Zen 4, Sapphire Rapids) a bf16 matmul beats fp32
and a tiny-preset training step under bf16 autocast is ~1.3x faster. Without them (AVX2-only, e.g. Zen 3)
torch still runs bf16, but emulated: 50-100x slower than fp32 on a 2-core Zen 3, where torch.optim.Muon, which
always orthogonalises in bf16, made a tiny-preset step 3x an AdamW step (bench/optimizer_step.py).
So a tiny timed probe (a few milliseconds, once per process and device) compares a bf16 and an fp32 matmul
on this device, and every bf16 path — training autocast for every stage, and Muon's orthogonalisation —
follows its answer. GPTSTACK_CPU_BF16=0/1 overrides the probe (tests force the slow path with it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

# bf16 counts as fast when a bf16 matmul takes at most this fraction of the fp32 one's time. Native bf16 is
# well under 1; emulated bf16 is 10-100x over it, so the exact threshold does not matter.
FAST_BF16_RATIO = 1.0


def resolve_device(name: str = "auto") -> "torch.device":
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None


def resolve_dtype(name: str, device: "torch.device", training: bool = False) -> "torch.dtype | None":
    """The autocast dtype, or None for plain fp32.

    "auto": bf16 on GPUs that support it; for *training* also on CPUs where the probe finds bf16 matmuls fast
    (on a 2-core Zen 4, bench/train_throughput.py --dtype bf16: 4,736 vs 3,667 tok/s). Generation on CPU stays
    fp32: one-token decode steps are bound by reading the weights, and autocast re-casts them every step
    (measured 207 vs 246 tok/s at batch 1). An explicit dtype is taken as given, with a notice where it is
    slow on this CPU."""
    import torch

    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if training and device.type == "cpu" and bf16_is_fast(device.type):
            return torch.bfloat16
        return None
    table = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r} (use auto, fp32, bf16 or fp16)")
    if table[name] is torch.bfloat16 and device.type == "cpu" and not bf16_is_fast("cpu"):
        _notice_once("note: --dtype bf16 on a CPU without fast bf16 matmuls (measured "
                     f"{bf16_probe('cpu')['bf16_over_fp32']:.0f}x slower than fp32 here); --dtype auto picks fp32")
    return table[name]


def matmul_dtype(device: "torch.device") -> "torch.dtype":
    """The dtype for an optimizer's own matrix products: bf16 where it is fast (GPUs, CPUs with native bf16),
    fp32 elsewhere. Muon's Newton-Schulz iteration is robust to bf16 (it was designed for it), so the choice
    is about speed, not accuracy."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and bf16_is_fast("cpu"):
        return torch.bfloat16
    return torch.float32


def bf16_is_fast(device_type: str = "cpu") -> bool:
    env = os.environ.get("GPTSTACK_CPU_BF16") if device_type == "cpu" else None
    if env in ("0", "1"):
        return env == "1"
    return bf16_probe(device_type)["bf16_over_fp32"] <= FAST_BF16_RATIO


@functools.lru_cache(maxsize=None)
def bf16_probe(device_type: str = "cpu") -> dict:
    """Time one bf16 and one fp32 matmul of a linear layer's shape (128 x 512 @ 512 x 512) on this device with
    the current thread count: best of three each. Emulated bf16 is caught by its first repetition (10-100x the
    fp32 time), so a slow machine pays ~0.1 s once per process and a fast one a few milliseconds."""
    import torch

    device = torch.device(device_type)
    if device.type == "mps":  # no cheap synchronised timing there; autocast stays off on MPS
        return {"bf16_over_fp32": float("inf"), "fp32_ms": 0.0, "bf16_ms": 0.0}
    g = torch.Generator().manual_seed(0)
    a32 = torch.randn(128, 512, generator=g).to(device)
    b32 = torch.randn(512, 512, generator=g).to(device)

    def best(a, b, reps: int, stop_above: float = float("inf")) -> float:
        times = []
        a @ b   # warm-up: kernel selection, first-touch allocation
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if times[-1] > stop_above:
                break
        return min(times)

    with torch.no_grad():
        t32 = best(a32, b32, 3)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        t16 = best(a16, b16, 3, stop_above=4 * t32)
    return {"bf16_over_fp32": round(t16 / max(t32, 1e-9), 3), "fp32_ms": round(t32 * 1e3, 3),
            "bf16_ms": round(t16 * 1e3, 3)}


def autocast(device: "torch.device", dtype: "torch.dtype | None"):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---- threads ----------------------------------------------------------------------------------------------

def set_threads(n: int = 0) -> int:
    """Use `n` torch threads (0: GPTSTACK_THREADS if set, else leave torch's default of one per core).
    Returns the thread count in use."""
    import torch

    if not n:
        env = os.environ.get("GPTSTACK_THREADS", "").strip()
        try:
            n = int(env or 0)
        except ValueError:
            raise ConfigError(f"GPTSTACK_THREADS must be a whole number of threads, got {env!r}") from None
    if n < 0:
        raise ConfigError(f"--threads must be >= 0, got {n}")
    if n:
        torch.set_num_threads(n)
        os.environ["GPTSTACK_THREADS"] = str(n)   # the choice is explicit: later stages keep it
    return torch.get_num_threads()


def threads_were_chosen() -> bool:
    return bool(os.environ.get("GPTSTACK_THREADS"))


def busy_cores(window_s: float = 0.15) -> float:
    """Cores kept busy by *other* processes: CPU time spent machine-wide (/proc/stat) minus this process's
    own (/proc/self/stat) over a short window, in cores (at the kernel's 100 Hz accounting, 0.15 s resolves
    ~0.1 core on 2 cores: enough for the 0.75-core threshold). 0.0 where /proc is not there (not Linux)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(fields) - idle, int(own[11]) + int(own[12])     # busy jiffies, our utime + stime

    try:
        busy0, own0 = sample()
        t0 = time.monotonic()
        time.sleep(window_s)
        busy1, own1 = sample()
        dt = time.monotonic() - t0
    except (OSError, ValueError, IndexError):
        return 0.0
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / hz / dt)


def fit_threads_to_free_cores(busy: float) -> tuple[int, str | None]:
    """When other processes keep cores busy, one torch thread per core makes every matmul wait for the
    thread that lost its core: steps were measured 2-6x slower on a shared 2-core machine. Unless the user
    chose a thread count (--threads, GPTSTACK_THREADS), use only the free cores. Returns (threads, notice)."""
    import torch

    global _default_threads
    if _default_threads is None:
        _default_threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    if threads_were_chosen():
        threads = torch.get_num_threads()
        if busy >= 0.75 and threads + busy > cores + 0.25:
            return threads, (f"note: other processes keep ~{busy:.1f} of {cores} cores busy; the {threads} torch "
                             f"threads you chose will wait for them (steps can be several times slower)")
        return threads, None
    want = _default_threads
    if busy >= 0.75 and want + busy > cores + 0.25:
        want = max(1, min(want, int(cores - busy + 0.5)))
    torch.set_num_threads(want)    # also back up to the default once the other work is gone
    if want < _default_threads:
        return want, (f"note: other processes keep ~{busy:.1f} of {cores} cores busy: training on {want} torch "
                      f"thread{'s' if want > 1 else ''} instead of {_default_threads} (--threads N to choose)")
    return want, None


_default_threads: int | None = None


_shown: set[str] = set()


def _notice_once(msg: str) -> None:
    if msg not in _shown:
        _shown.add(msg)
        print(msg, flush=True)


# ---- what a run records about its machine -----------------------------------------------------------------

_CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile",
                          "asimd", "sve", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_description() -> dict:
    """CPU model and the vector flags that decide matmul speed (Linux /proc/cpuinfo; platform elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "arch": platform.machine(), "cores": os.cpu_count() or 1,
            "flags": [f for f in _CPU_FLAGS_OF_INTEREST if f in flags]}


def machine_info(device: "torch.device", amp_dtype: "torch.dtype | None" = None,
                 optimizer_dtype: "torch.dtype | None" = None) -> dict:
    """The facts a figure needs to be reproduced: CPU (model, flags), GPU, threads, torch, chosen precision."""
    import torch

    info = {"cpu": cpu_description(), "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "autocast": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "fp32"}
    if optimizer_dtype is not None:
        info["optimizer_matmul"] = str(optimizer_dtype).replace("torch.", "")
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    if device.type == "cpu":
        env = os.environ.get("GPTSTACK_CPU_BF16")
        if env in ("0", "1"):   # forced: no probe is run (nor needed)
            info["bf16_probe"] = {"fast": env == "1", "forced_by_env": env}
        else:
            info["bf16_probe"] = dict(bf16_probe("cpu"), fast=bf16_is_fast("cpu"))
    return info
