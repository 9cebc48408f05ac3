"""Weights in: a Hugging Face folder, a hub id or a `.gguf` file, on a device, in a dtype.

Part of `cloud.engine`, the package that alone imports torch and transformers. GGUF files
are dequantized by transformers, which is slow, so the result is saved once to
`<cache_dir>/converted/<stem>-<digest>/` and later loads read that folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DistributedConfig

from cloud.dtypes import read_cpu_bf16_flags, resolve_dtype

log = logging.getLogger(__name__)

_MIB = 1 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DEVICE_KINDS = ("cuda", "mps", "cpu")


def default_cache_dir() -> Path:
    env = os.environ.get("SPECTHINK_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "specthink"


def pick_device(device: str) -> torch.device:
    """Resolve "auto" to cuda, else mps, else cpu; an explicit device must exist."""
    cuda_ok = torch.cuda.is_available()
    mps_ok = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if device == "auto":
        return torch.device("cuda" if cuda_ok else "mps" if mps_ok else "cpu")
    kind = device.split(":")[0]
    if kind == "cuda" and not cuda_ok:
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    if kind == "mps" and not mps_ok:
        raise ValueError(f"device {device!r} asked for, but MPS is not available here")
    if kind not in _DEVICE_KINDS:
        raise ValueError(f"unknown device {device!r}: use auto, cuda, mps or cpu")
    return torch.device(device)


def gguf_digest(path: Path) -> str:
    """A short content key for a GGUF file: sha256 of (size, first MiB, last MiB)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(_MIB))
        f.seek(max(0, size - _MIB))
        h.update(f.read(_MIB))
    return h.hexdigest()[:16]


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")


def convert_gguf(path: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file once into a Hugging Face folder under `cache_dir/converted/`;
    returns the folder (read like any other: straight onto the device). The folder
    appears atomically (temp dir + rename), so a killed conversion leaves no half folder."""
    converted = cache_dir / "converted"
    folder = converted / f"{path.stem}-{gguf_digest(path)}"
    if (folder / "config.json").is_file():
        return folder
    _check_gguf(path)
    log.info("converting %s (once) to %s", path, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise ValueError(f"{path}: transformers cannot load this GGUF file: {e}") from e
    # The dequantized weights are plain tensors; drop the GGUF "quantizer" so
    # save_pretrained writes an ordinary checkpoint.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    converted.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=converted))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: keep theirs
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def hub_problem(model_id: str, timeout_s: float = 3.0) -> str | None:
    """Why a hub id cannot load here, found in seconds (None: it is in the local Hugging Face
    cache, or the hub answers). Without this, an offline machine spends a minute in the
    download client's retries before saying the same."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return (
            f"not in the local Hugging Face cache, and the hub ({host}) cannot be reached "
            f"({exc.strerror or type(exc).__name__}): download it where the hub is "
            "reachable, or give a model folder or a .gguf file"
        )
    return None


def resolve(model: str, cache_dir: Path) -> tuple[str, Path | None]:
    """(what to from_pretrained, the GGUF's converted folder if it was one)."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path}: not a model (expected a .gguf file or a model folder)")
        folder = convert_gguf(path, cache_dir)
        return str(folder), folder
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a model folder (no config.json)")
        return str(path), None
    if _HUB_ID.match(model) and not model.endswith(".gguf"):
        problem = hub_problem(model)
        if problem is not None:
            raise ValueError(f"{model}: {problem}")
        return model, None
    raise ValueError(f"{model}: no such model file or folder")


@dataclass(frozen=True)
class Weights:
    """A loaded model and its tokenizer, with where they were read from."""

    model: Any
    tokenizer: Any
    device: torch.device
    loaded_from: str  # the folder or hub id actually read
    converted_from: Path | None  # the GGUF file, when loaded_from is its conversion
    peak_host_bytes: int = 0  # the process's peak RSS once loaded (loading included)


def load_weights(
    model: str,
    device: str,
    dtype: str,
    cache_dir: Path | None,
    *,
    tp_plan: Literal["auto"] | None = None,
) -> Weights:
    """Load `model` onto `device` in `dtype` (auto, bfloat16, float16 or float32, see
    `cloud.dtypes.resolve_dtype`), in eval mode. With `tp_plan` ("auto": the model's own
    plan), this process loads its shard of a tensor-parallel model: it runs under torchrun,
    one process per device (`cloud.tensor_parallel`).

    Raises ValueError with a one-line message for an unknown path, a file that is not a
    model, an unreachable hub id, an unavailable device or an unknown dtype.
    """
    dev = pick_device(device)
    dtype_ = getattr(torch, resolve_dtype(dtype, dev.type, read_cpu_bf16_flags()).name)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source, converted = resolve(model, cache_dir)
    # Straight onto the device: transformers builds the model on the meta device and
    # reads each tensor from the checkpoint into its place (`device_map`), so the host
    # never holds a full copy. A GGUF is dequantized on the host once, when converted;
    # the converted folder is then read like any other.
    placement: dict[str, Any] = {"device_map": str(dev)}
    if tp_plan:
        placement = {"distributed_config": DistributedConfig(tp_plan=tp_plan)}
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model_obj = AutoModelForCausalLM.from_pretrained(source, dtype=dtype_, **placement)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{model}: cannot load (hub unreachable or not a model?): {first}") from e
    return Weights(
        model=model_obj.eval(),
        tokenizer=tokenizer,
        device=dev,
        loaded_from=source,
        converted_from=Path(model) if converted is not None else None,
        peak_host_bytes=peak_host_bytes(),
    )


def peak_host_bytes() -> int:
    """The process's peak resident memory so far (Linux: ru_maxrss in KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
