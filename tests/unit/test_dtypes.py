"""The cloud's dtype choice (`--dtype`), as a table: requested x device x CPU flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.dtypes import cpu_bf16_flags, parse_dtype, read_cpu_bf16_flags, resolve_dtype

AMX = ("amx_bf16",)
AVX512 = ("avx512_bf16",)


@pytest.mark.parametrize(
    ("requested", "device", "cpu_bf16", "expected"),
    [
        ("auto", "cuda", (), "bfloat16"),
        ("auto", "mps", (), "float16"),
        ("auto", "cpu", (), "float32"),
        ("auto", "cpu", AMX, "bfloat16"),
        ("auto", "cpu", AVX512, "bfloat16"),
        ("AUTO", "cpu", AMX + AVX512, "bfloat16"),
        ("float32", "cuda", (), "float32"),
        ("float16", "cpu", (), "float16"),
        ("bfloat16", "cpu", (), "bfloat16"),
        (" Float32 ", "cpu", AMX, "float32"),
    ],
)
def test_dtype_choice_follows_request_device_and_cpu(
    requested: str, device: str, cpu_bf16: tuple[str, ...], expected: str
) -> None:
    assert resolve_dtype(requested, device, cpu_bf16).name == expected


def test_auto_dtype_says_why() -> None:
    assert resolve_dtype("auto", "cpu", AMX).reason == "auto: this CPU has native bf16 (amx_bf16)"
    assert "no native bf16" in resolve_dtype("auto", "cpu", ()).reason
    assert resolve_dtype("float16", "cpu", ()).reason == "asked for with --dtype"


@pytest.mark.parametrize("bad", ["fp16", "half", "", "float64", "int8"])
def test_unknown_dtype_is_one_line_error(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown dtype") as info:
        parse_dtype(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype(bad, "cuda", ())


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n", AMX),
        ("flags\t\t: fpu avx512f avx512_bf16\n", AVX512),
        ("flags\t\t: fpu avx2 avx512f avx512_vnni\n", ()),
        ("flags\t\t: amx_bf16 avx512_bf16\nflags\t\t: fpu\n", AMX + AVX512),
        ("Features\t: fp asimd bf16\n", ()),  # arm: not a flags line
        ("", ()),
    ],
)
def test_cpu_bf16_flags_are_read_from_the_flags_line(
    cpuinfo: str, expected: tuple[str, ...]
) -> None:
    assert cpu_bf16_flags(cpuinfo) == expected


def test_missing_cpuinfo_means_no_native_bf16(tmp_path: Path) -> None:
    assert read_cpu_bf16_flags(tmp_path / "absent") == ()
