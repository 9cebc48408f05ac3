"""The device check's model and its prepared files: the named shapes (Qwen2.5-32B's
architecture and a toy of the same family), preparing the tokenizer and wheels here, loading
the carried tokenizer there, and building the randomly initialised model on the device."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PREPARED = ROOT / "build" / "gpu_check"
TOKENIZER_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"  # Qwen2's tokenizer, bundled
# the wheels a device image may lack or hold too old for shared/rpc's generated code
WHEEL_PACKAGES = ("grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf")
WHEEL_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)

# Qwen2.5-32B's published config.json (the base model, which DeepSeek-R1-Distill-Qwen-32B
# keeps; the Instruct model differs only in rms_norm_eps 1e-6 and its eos id, neither of
# which changes speed or memory).
QWEN25_32B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "max_position_embeddings": 131072,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 131072,
    "max_window_layers": 64,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
TINY = {
    **QWEN25_32B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "max_window_layers": 2,
}


@dataclass(frozen=True)
class Shape:
    name: str
    config: dict[str, Any]
    context_length: int  # the engines' --context-length in the sections (sizes the plan)
    probe_context: int  # ... in the OOM probe
    budget_s: float  # default --budget-s
    decode_steps: int  # timed decode steps per batch size
    decode_prompt: int  # prompt tokens per session in the decode sweep
    probe_cap: int | None  # most prompt tokens per session in the OOM probe (None: the plan's)
    needs_s: dict[str, float]  # least seconds a section needs to be worth starting


SHAPES = {
    # context 4096 in the sections: the plan then holds 64 sessions (a paged slot is one
    # full context); the OOM probe serves Qwen2.5's usual 32k
    "32b": Shape(
        "32b",
        QWEN25_32B,
        context_length=4096,
        probe_context=32768,
        budget_s=450.0,
        decode_steps=16,
        decode_prompt=128,
        probe_cap=None,
        needs_s={
            "bandwidth": 5,
            "decode": 25,
            "prefill": 8,
            "judge": 6,
            "overhead": 10,
            "grpc": 30,
            "oom": 40,
        },
    ),
    "tiny": Shape(
        "tiny",
        TINY,
        context_length=4096,
        probe_context=4096,
        budget_s=240.0,
        decode_steps=6,
        decode_prompt=48,
        probe_cap=64,
        needs_s={
            "bandwidth": 1,
            "decode": 3,
            "prefill": 1,
            "judge": 1,
            "overhead": 2,
            "grpc": 5,
            "oom": 3,
        },
    ),
}


# ---- preparing (here): the tokenizer as files, the wheels the device may lack ------------


def prepare(folder: Path, wheels: bool = True) -> None:
    """Write folder/tokenizer (Qwen2's tokenizer, from the bundled GGUF) and, with `wheels`,
    folder/wheels (grpcio, protobuf and the two grpcio add-ons at the versions installed
    here, for CPython 3.12 on x86-64)."""
    extract_tokenizer(folder / "tokenizer")
    if wheels:
        download_wheels(folder / "wheels")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"prepared {folder}: {size / (1 << 20):.1f} MiB in all", flush=True)


def extract_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    from edge import bundled

    gguf = bundled.ensure(bundled.QWEN25_CODER_05B, ROOT / "models")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    print(
        f"tokenizer: {type(tokenizer).__name__} ({len(tokenizer)} ids) from {gguf.name} "
        f"-> {folder} ({size / (1 << 20):.1f} MiB)",
        flush=True,
    )


def wheel_command(folder: Path) -> list[str]:
    """`pip download` of WHEEL_PACKAGES, pinned to the versions installed here."""
    from importlib import metadata

    pins = [f"{name}=={metadata.version(name)}" for name in WHEEL_PACKAGES]
    platforms = [x for p in WHEEL_PLATFORMS for x in ("--platform", p)]
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(folder),
        *pins,
    ]


def download_wheels(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()  # one version of each: two would stop the install there
    subprocess.run(wheel_command(folder), check=True)
    names = sorted(p.name for p in folder.glob("*.whl"))
    print(f"wheels -> {folder}: {', '.join(names)}", flush=True)


def load_tokenizer(folder: Path) -> Any:
    """The carried tokenizer; `tokenizer.json` alone if this transformers cannot read the
    saved config (it was written by another version)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        print(f"  AutoTokenizer failed ({type(exc).__name__}: {exc}); tokenizer.json alone")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"),
            bos_token=config.get("bos_token"),
            eos_token=config.get("eos_token"),
            pad_token=config.get("pad_token"),
        )
        template = folder / "chat_template.jinja"
        if template.exists():
            tokenizer.chat_template = template.read_text()
        return tokenizer


# ---- the model: random weights of the named architecture, on the device -----------------


def build_model(shape: Shape, device: Any, first_special: int) -> tuple[Any, dict[str, Any]]:
    """Qwen2ForCausalLM of `shape`, allocated on `device` in bf16 and initialised there
    (transformers' own init: normal(0, 0.02) weights, unit norms). The output rows of the
    special and padding ids (from `first_special` on) are zeroed: their logit is then 0
    while the best of ~150k random logits is well above it, so a greedy takeover never
    ends on EOS or writes an id the tokenizer has no text for."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**{k: v for k, v in shape.config.items() if k != "model_type"})
    started = time.perf_counter()
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except TypeError:  # a transformers before `dtype`
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.eval()
    with torch.no_grad():
        model.lm_head.weight[first_special:].zero_()
    sync(device)
    build_s = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    # a decode step reads every weight once, except the input embedding (one row per token)
    step_bytes = weight_bytes - embed.numel() * embed.element_size()
    with torch.inference_mode():
        ids = torch.randint(0, first_special, (1, 16), device=device)
        logits = model(input_ids=ids).logits
        ok = bool(torch.isfinite(logits).all().item())
    info = {
        "class": type(model).__name__,
        "params": params,
        "weight_bytes": weight_bytes,
        "decode_step_bytes": step_bytes,
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "build_s": round(build_s, 2),
        "logits_finite": ok,
        "config": shape.config,
    }
    return model, info


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
