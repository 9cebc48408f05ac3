"""Which floating-point type the cloud loads its weights in: a pure decision, no torch.

`resolve_dtype` turns `--dtype auto|bfloat16|float16|float32`, the device kind and
whether the CPU computes bf16 natively into a dtype name and the reason for it:

    auto on cuda                        -> bfloat16  (tensor cores run bf16)
    auto on mps                         -> float16   (Metal's fast type)
    auto on a CPU with AMX or AVX512-BF16 -> bfloat16  (half the memory, native matmuls)
    auto on any other CPU               -> float32   (bf16 would be emulated: slower)
    an explicit name                    -> that name, on any device

The engine (`cloud.engine.weights`; only that package imports torch) maps the name to `torch.<name>`; the CLI
validates the flag with `parse_dtype` before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
# /proc/cpuinfo flags of CPUs with native bf16 arithmetic (Intel AMX, AVX512-BF16 on
# Cooper Lake / Sapphire Rapids / Zen 4); torch uses them through oneDNN.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # "bfloat16", "float16" or "float32" (a torch attribute name)
    reason: str  # why, for the start-up line and logs


def parse_dtype(value: str) -> str:
    """The flag's value, lower-cased; ValueError (one line) for anything else."""
    name = value.strip().lower()
    if name not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {value!r}: use {', '.join(DTYPE_CHOICES)}")
    return name


def cpu_bf16_flags(cpuinfo: str) -> tuple[str, ...]:
    """The native-bf16 flags in a /proc/cpuinfo text (those of the first `flags` line)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            present = set(value.split())
            return tuple(f for f in BF16_CPU_FLAGS if f in present)
    return ()


def read_cpu_bf16_flags(path: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """This machine's native-bf16 CPU flags; () where /proc/cpuinfo is missing (macOS)."""
    try:
        return cpu_bf16_flags(path.read_text(errors="replace"))
    except OSError:
        return ()


def resolve_dtype(requested: str, device_kind: str, cpu_bf16: tuple[str, ...]) -> DtypeChoice:
    """The dtype to load in, and why. `device_kind` is cuda, mps or cpu; `cpu_bf16`
    the CPU's native-bf16 flags (see `read_cpu_bf16_flags`)."""
    name = parse_dtype(requested)
    if name != "auto":
        return DtypeChoice(name, "asked for with --dtype")
    if device_kind == "cuda":
        return DtypeChoice("bfloat16", "auto: bfloat16 on CUDA")
    if device_kind == "mps":
        return DtypeChoice("float16", "auto: float16 on MPS")
    if cpu_bf16:
        return DtypeChoice("bfloat16", f"auto: this CPU has native bf16 ({', '.join(cpu_bf16)})")
    return DtypeChoice("float32", "auto: this CPU has no native bf16 (amx_bf16/avx512_bf16)")
