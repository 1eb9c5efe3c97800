"""The device a run trains on, and what makes it fast there: precision (bf16 autocast where the hardware has it),
torch.compile (compile=off|on|auto), cuDNN's autotuner on CUDA. The training core (fer_tune.train) asks here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .common import FerTuneError

# What compile=auto does per device type: what benchmarks/bench_compile.py measured best (RESULTS.md,
# "torch.compile"): on a CPU the compiled model trained 11-25 % slower than eager at widths 0.125 to 1, fp32 and
# bf16. CUDA has no figure yet (no GPU has run benchmarks/gpu.sh): auto stays eager there until one does.
AUTO_COMPILE = {"cpu": False, "cuda": False}


def select_device(name: str | None = None) -> torch.device:
    """'cuda', 'cpu', 'cuda:1' or None (CUDA when usable, else CPU)."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise FerTuneError(f"device {name!r} requested but CUDA is not available here")
        return torch.device(name)
    if torch.cuda.is_available():
        try:
            torch.zeros(1, device="cuda")
            return torch.device("cuda")
        except RuntimeError:  # e.g. CUDA_VISIBLE_DEVICES set by Ray for a fake GPU resource
            pass
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True on a CPU with bf16 arithmetic in hardware: x86 avx512_bf16 or AMX (amx_bf16), Arm bf16 (Linux's
    /proc/cpuinfo flags). Other CPUs emulate bf16 and gain nothing from it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def precision(device: torch.device, amp: str = "auto") -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, use GradScaler) for `amp` (auto | bf16 | off) on `device`.

    auto: CUDA -> bf16 where supported, else fp16 + GradScaler; CPU -> bf16 where the CPU has it natively
    (benchmarks/RESULTS.md, "bf16 on a CPU"), else fp32. bf16 forces bf16 autocast; off is fp32 everywhere.
    The loss and the softmax are computed in fp32 in every mode."""
    if amp == "bf16" and device.type not in ("cuda", "cpu"):
        raise FerTuneError(f"amp=bf16 is supported on CUDA and CPU devices, not on {device.type}; use amp=auto")
    if amp == "off" or device.type not in ("cuda", "cpu"):
        return None, False
    if device.type == "cpu":
        return (torch.bfloat16, False) if amp == "bf16" or cpu_has_native_bf16() else (None, False)
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    if amp == "bf16":
        raise FerTuneError(
            f"amp=bf16: the GPU {torch.cuda.get_device_name(device)} has no bf16; use amp=auto "
            "(fp16 with a gradient scaler) or amp=off"
        )
    return torch.float16, True


def precision_name(dtype: torch.dtype | None) -> str:
    """'bf16', 'fp16' or 'fp32': what a run records as its precision."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def resumed_precision(device: torch.device, amp: str, checkpoint: dict) -> tuple[torch.dtype | None, bool]:
    """precision() for a run that continues `checkpoint`: with amp=auto, the precision the checkpoint trained
    with (checkpoints that do not record it are from versions whose auto meant fp32 on a CPU), so that a resumed
    run never changes its arithmetic half-way, whatever this machine's CPU has."""
    recorded = checkpoint.get("precision") or ("fp32" if device.type == "cpu" else "")
    if amp != "auto" or not recorded:
        return precision(device, amp)
    return {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, True), "fp32": (None, False)}[recorded]


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def use_compile(setting: str, device: torch.device) -> bool:
    """Whether a run with compile=`setting` (off | on | auto) compiles its model on `device`."""
    if setting == "auto":
        return AUTO_COMPILE.get(device.type, False)
    return setting == "on"


def compile_model(model: torch.nn.Module, setting: str, device: torch.device) -> bool:
    """torch.compile the model in place (its state_dict keys stay as they are) when `setting` says so on `device`;
    True if it did. Inductor's cache is fer-tune's cache directory, one per machine: the trials of a node (and
    later runs) reuse each other's compiled kernels."""
    if not use_compile(setting, device):
        return False
    from .data import default_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(default_cache_dir()) / "inductor"))
    # inductor's C++ toolchain notes ("No CUDA runtime is found, using CUDA_HOME=...") are not the user's business
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    model.compile()
    return True


def prepare_device(device: torch.device) -> None:
    """Settings for a run on `device`: cuDNN picks its fastest convolution for the run's fixed shapes on CUDA, and
    the peak of GPU memory a run reports is its own (Tune runs trial after trial in one process)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
