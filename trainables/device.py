"""Where a job runs and in which precision: the one device picker, the bf16 policy, and the
description of the machine that every run records.

Precision policy: training uses bf16 autocast where the device computes bf16 natively (``bf16:
auto``); everything that is recorded and later compared (val/test probabilities and metrics,
committee inputs, the unit analysis) is computed in fp32 with the model in the contiguous memory
format, exactly as a model rebuilt from ``spec.json`` + ``model.pt`` runs it.
"""

from __future__ import annotations

import platform
import sys
from functools import lru_cache

import torch

from trainables.schema import InputError

DEVICES = ("auto", "cpu", "cuda")
EVAL_PRECISION = "fp32"  # evaluation of record, whatever the training precision
ENVIRONMENT_KEYS = ("device", "cpu", "cpu_flags", "torch", "train_precision", "eval_precision")  # describe()'s
NUMERIC_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")  # flags that change kernels


def pick_device(name: str = "auto", where: str = "device") -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU. ``cuda`` without a GPU, or an unknown
    name, is an ``InputError`` naming ``where``."""
    if name not in DEVICES:
        raise InputError(where, f"must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError(where, "cuda requested but no CUDA device is visible")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX (without them oneDNN emulates bf16, hundreds of times slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def train_flags(bf16: bool | str, channels_last: bool | str, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) for training on ``device``. bf16 ``auto`` is on where
    ``device`` has native bf16 (``True`` on a device without it warns once: emulated bf16 is very
    slow); channels_last ``auto`` is on for CUDA."""
    native = native_bf16(device)
    autocast = native if bf16 == "auto" else bool(bf16)
    if bf16 is True and not native:
        print(
            f"warning: config.bf16 is true but this {device.type} has no native bf16 (emulated, often 100x "
            "slower than fp32); bf16: auto turns it on only where it is native",
            file=sys.stderr,
        )
    last = device.type == "cuda" if channels_last == "auto" else bool(channels_last)
    return autocast, last


@lru_cache(maxsize=1)
def _cpu() -> tuple[str, str]:
    """(CPU model name, the numerics-relevant flags it has, comma-separated), from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if "model name" in fields and "flags" in fields:
                    break
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    model = fields.get("model name") or platform.processor() or platform.machine()
    return model, ",".join(f for f in NUMERIC_CPU_FLAGS if f in flags)


def describe(device: torch.device, autocast: bool) -> dict[str, str]:
    """What a run ran on: device, CPU model and flags, torch version, training and evaluation precision."""
    cpu, flags = _cpu()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu,
        "cpu_flags": flags or "none",
        "torch": torch.__version__,
        "train_precision": "bf16" if autocast else "fp32",
        "eval_precision": EVAL_PRECISION,
    }
