"""The engine knows nothing about gRPC, auth, deltas or the policy: text in, text out, with a per-session KV cache.

`TransformersEngine` implements `cloud.engine_api.Engine` and is the only module in the
project that imports torch or transformers.

One call, in the order the code runs it:

1. render    conversation + assistant text -> one string (chat template, or a plain prompt)
2. tokenize  the *whole* string; BPE merges across the old/new boundary, so token ids
             are never appended to a cached list, they are re-derived from the text
3. reuse     longest common token prefix with the session's cached ids; crop the KV
             cache to it (one token less if everything is cached: the last token's
             logits are needed to sample)
4. prefill   the rest in chunks of `prefill_chunk`, should_stop() between chunks
5. decode    one token at a time, should_stop() before each step; stream text through
             an incremental detokenizer; stop on EOS, max_tokens, a stop string or a
             full context window
6. keep      the session holds exactly the ids whose KV is computed; LRU eviction within
             `max_cache_bytes`, idle eviction after `session_ttl_s`

Models without a chat template get `shared.prompting.plain_prompt` (the same on the
edge), then the assistant text verbatim.

Models are loaded from a Hugging Face folder, a hub id (only where the hub is
reachable), or a `.gguf` file. GGUF files are dequantized by transformers, which is slow,
so the result is saved once to `<cache_dir>/converted/<stem>-<digest>/` and later loads
read that folder.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from cloud.dtypes import read_cpu_bf16_flags, resolve_dtype
from cloud.engine_api import (
    CacheStats,
    Engine,
    EngineCancelled,
    EngineContextFull,
    EngineInfo,
    Generated,
    Prefilled,
    ShouldStop,
)
from shared.prompting import join_prompt, plain_prompt
from shared.wire import (
    FINISH_CONTEXT_FULL,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_STOP_STRING,
    Message,
    Sampling,
    TextChunk,
    Usage,
)

log = logging.getLogger(__name__)

_MIB = 1 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"cuda": torch.bfloat16, "mps": torch.float16, "cpu": torch.float32}
# Prompt tokens handed to the detokenizer as context, so the first generated token
# decodes with the right leading space / byte merges.
_DETOK_CONTEXT = 6


def default_cache_dir() -> Path:
    env = os.environ.get("SPECTHINK_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "specthink"


# ---- loading ---------------------------------------------------------------------------


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
    if kind not in _DTYPES:
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


def convert_gguf(path: Path, cache_dir: Path) -> tuple[Path, Any, Any]:
    """Dequantize a GGUF file once into a Hugging Face folder under `cache_dir/converted/`.

    Returns (folder, model, tokenizer); model and tokenizer are None when the folder was
    already there. The folder appears atomically (temp dir + rename), so a killed
    conversion leaves no half folder behind.
    """
    converted = cache_dir / "converted"
    folder = converted / f"{path.stem}-{gguf_digest(path)}"
    if (folder / "config.json").is_file():
        return folder, None, None
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
    return folder, model, tokenizer


def _resolve(model: str, cache_dir: Path) -> tuple[str, Path | None, Any, Any]:
    """(what to from_pretrained, the GGUF converted folder if any, preloaded model/tokenizer)."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path}: not a model (expected a .gguf file or a model folder)")
        folder, m, t = convert_gguf(path, cache_dir)
        return str(folder), folder, m, t
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a model folder (no config.json)")
        return str(path), None, None, None
    if _HUB_ID.match(model) and not model.endswith(".gguf"):
        return model, None, None, None
    raise ValueError(f"{model}: no such model file or folder")


# ---- sessions --------------------------------------------------------------------------


@dataclass
class _Session:
    ids: list[int]  # exactly the tokens whose KV the cache holds
    cache: Any  # transformers DynamicCache
    last_use: float
    held_bytes: int = 0  # its KV bytes when last checked in (counted in the engine's total)

    def nbytes(self) -> int:
        return _cache_bytes(self.cache)


def _cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


def _crop(cache: Any, n: int) -> None:
    """Cut every layer of `cache` to its first `n` tokens (layers may disagree after an
    interrupted forward, so each is cut on its own)."""
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() >= 2 and keys.shape[-2] > n:
            layer.crop(n - keys.shape[-2])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ---- sampling and detokenizing ---------------------------------------------------------


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token id from a [vocab] logits vector: greedy at temperature 0, otherwise
    temperature, then top_k (0 = off), then top_p (nucleus)."""
    logits = logits.float().cpu()
    if s.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / s.temperature
    if 0 < s.top_k < logits.numel():
        values, order = torch.topk(logits, s.top_k)  # sorted, highest first
    else:
        values, order = torch.sort(logits, descending=True)
    if 0 < s.top_p < 1:
        p = torch.softmax(values, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        values = values.masked_fill((p.cumsum(dim=-1) - p) >= s.top_p, float("-inf"))
    probs = torch.softmax(values, dim=-1)
    return int(order[torch.multinomial(probs, 1, generator=generator)])


class IncrementalDetokenizer:
    """Token ids in, text out, as TGI and vLLM do it: decode a short window before and
    after the newest token and emit the difference, so SentencePiece leading spaces and
    multi-byte characters split over tokens come out right. Text ending in U+FFFD (an
    incomplete character) is held back until the next token completes it."""

    def __init__(self, tokenizer: Any, context: Sequence[int]):
        self._tok = tokenizer
        self.ids = list(context)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""


def find_stop(text: str, stop: Sequence[str], start: int) -> int | None:
    """The end (exclusive) of the earliest stop string in text[start:], or None."""
    best: int | None = None
    for s in stop:
        if not s:
            continue
        i = text.find(s, start)
        if i >= 0 and (best is None or i + len(s) < best):
            best = i + len(s)
    return best


# ---- the engine ------------------------------------------------------------------------


class TransformersEngine:
    """`cloud.engine_api.Engine` on torch + transformers. Build it with `load()`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        device: torch.device,
        loaded_from: str,
        converted_from: Path | None = None,
        max_cache_bytes: int = 2 << 30,
        session_ttl_s: float = 600.0,
        prefill_chunk: int = 512,
        context_length: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.loaded_from = loaded_from  # the folder or hub id actually read
        self.converted_from = converted_from  # the GGUF file, when loaded_from is its conversion
        self.load_s = 0.0
        self.max_cache_bytes = max_cache_bytes
        self.session_ttl_s = session_ttl_s
        self.prefill_chunk = max(1, prefill_chunk)
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # LRU first
        self._hits = self._misses = self._evictions = 0
        self._held_bytes = 0  # KV bytes of the sessions in the table, kept as a running total

        cfg = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        model_ctx = int(getattr(cfg, "max_position_embeddings", 0) or 0) or 2048
        self.context_length = min(context_length, model_ctx) if context_length else model_ctx
        template = getattr(tokenizer, "chat_template", None)
        self.info = EngineInfo(
            model_id=model_id,
            tokenizer=type(tokenizer).__name__,
            context_length=self.context_length,
            device=str(device),
            dtype=str(model.dtype).removeprefix("torch."),
            chat_template=bool(template),
        )
        self._eos = self._eos_ids()
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def load(
        cls,
        model: str,
        device: str = "auto",
        cache_dir: Path | None = None,
        max_cache_bytes: int = 2 << 30,
        session_ttl_s: float = 600.0,
        prefill_chunk: int = 512,
        clock: Callable[[], float] = time.monotonic,
        *,
        context_length: int | None = None,
        num_threads: int | None = None,
        dtype: str = "auto",
    ) -> TransformersEngine:
        """Load a Hugging Face folder, hub id or `.gguf` file (converted once, then cached).

        Raises ValueError with a one-line message for an unknown path, a file that is not
        a model, an unreachable hub id, an unavailable device or an unknown dtype.
        `dtype` is auto, bfloat16, float16 or float32 (see `cloud.dtypes.resolve_dtype`).
        """
        t0 = time.perf_counter()
        if num_threads:
            torch.set_num_threads(num_threads)
        dev = pick_device(device)
        weights = getattr(torch, resolve_dtype(dtype, dev.type, read_cpu_bf16_flags()).name)
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        source, converted, model_obj, tokenizer = _resolve(model, cache_dir)
        if model_obj is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
                model_obj = AutoModelForCausalLM.from_pretrained(source, dtype=weights)
            except OSError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(
                    f"{model}: cannot load (hub unreachable or not a model?): {first}"
                ) from e
        else:
            model_obj = model_obj.to(weights)
        model_obj = model_obj.to(dev).eval()
        engine = cls(
            model_obj,
            tokenizer,
            model_id=model,
            device=dev,
            loaded_from=source,
            converted_from=Path(model) if converted is not None else None,
            max_cache_bytes=max_cache_bytes,
            session_ttl_s=session_ttl_s,
            prefill_chunk=prefill_chunk,
            context_length=context_length,
            clock=clock,
        )
        engine.load_s = time.perf_counter() - t0
        return engine

    # ---- text -> ids ---------------------------------------------------------------

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None) if gen is not None else None
        if isinstance(extra, int):
            ids.add(extra)
        elif extra:
            ids.update(int(i) for i in extra)
        return frozenset(ids)

    def render(self, messages: Sequence[Message], assistant_text: str) -> str:
        """The prompt string: chat template (or the plain format above) joined to the
        assistant text by `join_prompt`: the text, not the template's revision, says whether
        the answer is inside a think block."""
        if self.info.chat_template:
            head = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
            return join_prompt(str(head), assistant_text)
        return join_prompt(plain_prompt(messages), assistant_text)

    def tokenize(self, messages: Sequence[Message], assistant_text: str) -> list[int]:
        text = self.render(messages, assistant_text)
        bos = self.tokenizer.bos_token
        # A template that writes BOS itself must not get a second one from the tokenizer.
        add_special = not (self.info.chat_template and bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special).input_ids)

    def count_tokens(self, messages: Sequence[Message], assistant_text: str) -> int:
        return len(self.tokenize(messages, assistant_text))

    # ---- session cache -------------------------------------------------------------

    def _checkout(self, session: str) -> _Session:
        """Take the session out of the table for the duration of a call (a fresh one on a
        miss), after evicting idle sessions."""
        now = self._clock()
        with self._lock:
            for sid, idle in list(self._sessions.items()):
                if now - idle.last_use > self.session_ttl_s:
                    self._remove(sid)
                    self._evictions += 1
            found = self._remove(session)
        return found or _Session(ids=[], cache=DynamicCache(), last_use=now)

    def _checkin(self, session: str, s: _Session) -> None:
        """Put the session back as most recently used; evict LRU sessions (this one last)
        until the total KV bytes fit the budget."""
        _crop(s.cache, len(s.ids))  # an interrupted forward may have left extra KV
        s.last_use = self._clock()
        s.held_bytes = s.nbytes()  # O(layers) once per call; the total is kept running
        with self._lock:
            self._sessions[session] = s
            self._sessions.move_to_end(session)
            self._held_bytes += s.held_bytes
            while self._held_bytes > self.max_cache_bytes and self._sessions:
                self._remove(next(iter(self._sessions)))
                self._evictions += 1

    def _remove(self, session: str) -> _Session | None:
        """Take a session out of the table and out of the byte total (lock held)."""
        found = self._sessions.pop(session, None)
        if found is not None:
            self._held_bytes -= found.held_bytes
        return found

    def drop(self, session: str) -> bool:
        with self._lock:
            return self._remove(session) is not None

    def cache_stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                sessions=len(self._sessions),
                bytes=self._held_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )

    # ---- the phases ----------------------------------------------------------------

    def _forward(self, s: _Session, ids: Sequence[int]) -> torch.Tensor:
        """Run `ids` after the session's cached tokens; returns the last position's logits."""
        start = len(s.ids)
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        kwargs: dict[str, Any] = {self._cache_kw: s.cache}
        out = self.model(
            input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs
        )
        s.ids.extend(ids)  # only once the forward has completed
        return out.logits[0, -1]

    def _reuse(self, s: _Session, prompt: list[int], need_logits: bool) -> int:
        """Crop the session to its longest common token prefix with `prompt`; returns
        how many prompt tokens are re-used. With need_logits, at least one prompt token
        is left to compute, since sampling needs the last position's logits."""
        keep = _common_prefix(s.ids, prompt)
        if need_logits:
            keep = min(keep, len(prompt) - 1)
        _crop(s.cache, keep)
        del s.ids[keep:]
        with self._lock:
            if keep > 0:
                self._hits += 1
            else:
                self._misses += 1
        return keep

    def _prefill(
        self, s: _Session, prompt: list[int], should_stop: ShouldStop
    ) -> torch.Tensor | None:
        """Compute KV for prompt[len(s.ids):] in chunks, checking should_stop() between them."""
        logits = None
        for start in range(len(s.ids), len(prompt), self.prefill_chunk):
            if should_stop():
                raise EngineCancelled("cancelled during prefill")
            logits = self._forward(s, prompt[start : start + self.prefill_chunk])
        return logits

    def _check_fits(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("empty prompt: nothing to continue")
        if len(prompt) > self.context_length:
            raise EngineContextFull(
                f"prompt is {len(prompt)} tokens; the context window is {self.context_length}"
            )

    def prefill(
        self,
        session: str,
        messages: Sequence[Message],
        assistant_text: str,
        should_stop: ShouldStop,
    ) -> Prefilled:
        prompt = self.tokenize(messages, assistant_text)
        self._check_fits(prompt)
        t0 = time.perf_counter()
        s = self._checkout(session)
        try:
            with torch.inference_mode():
                cached = self._reuse(s, prompt, need_logits=False)
                self._prefill(s, prompt, should_stop)
        finally:
            self._checkin(session, s)
        usage = Usage(len(prompt), cached, len(prompt) - cached, 0)
        return Prefilled(usage=usage, prefill_s=time.perf_counter() - t0)

    def generate(
        self,
        session: str,
        messages: Sequence[Message],
        assistant_text: str,
        max_tokens: int,
        sampling: Sampling,
        stop: Sequence[str],
        should_stop: ShouldStop,
    ) -> Iterator[TextChunk | Generated]:
        prompt = self.tokenize(messages, assistant_text)
        self._check_fits(prompt)  # raised at the call, before the first next()
        return self._generate(session, prompt, max_tokens, sampling, stop, should_stop)

    def _generate(
        self,
        session: str,
        prompt: list[int],
        max_tokens: int,
        sampling: Sampling,
        stop: Sequence[str],
        should_stop: ShouldStop,
    ) -> Iterator[TextChunk | Generated]:
        t0 = time.perf_counter()
        s = self._checkout(session)
        try:
            with torch.inference_mode():
                cached = self._reuse(s, prompt, need_logits=True)
                logits = self._prefill(s, prompt, should_stop)
                assert logits is not None  # _reuse left at least one token to compute
                t1 = time.perf_counter()
                generator = None
                if sampling.seed is not None:
                    generator = torch.Generator().manual_seed(sampling.seed)
                detok = IncrementalDetokenizer(self.tokenizer, prompt[-_DETOK_CONTEXT:])
                text = ""  # emitted so far
                held = 0  # tokens decoded but not yet emitted as text
                generated = 0
                pending: int | None = None  # sampled, KV not computed yet
                longest_stop = max((len(x) for x in stop), default=0)
                while True:
                    if generated >= max_tokens:
                        reason = FINISH_LENGTH
                        break
                    if len(prompt) + generated >= self.context_length:
                        reason = FINISH_CONTEXT_FULL
                        break
                    if should_stop():
                        raise EngineCancelled("cancelled during decode")
                    if pending is not None:
                        logits = self._forward(s, [pending])
                    token = sample(logits, sampling, generator)
                    generated += 1
                    pending = token
                    if token in self._eos:  # the answer is complete; EOS writes no text
                        reason = FINISH_STOP
                        break
                    held += 1
                    piece = detok.add(token)
                    if not piece:
                        continue
                    end = find_stop(text + piece, stop, max(0, len(text) - longest_stop + 1))
                    if end is not None:  # keep the stop string, cut what follows it
                        piece = (text + piece)[len(text) : end]
                        text += piece
                        if piece:
                            yield TextChunk(piece, held)
                        reason = FINISH_STOP_STRING
                        break
                    text += piece
                    yield TextChunk(piece, held)
                    held = 0
                t2 = time.perf_counter()
        finally:
            self._checkin(session, s)
        # Tokens still held back at the end are an incomplete character: not emitted.
        usage = Usage(len(prompt), cached, len(prompt) - cached, generated)
        yield Generated(reason, usage, prefill_s=t1 - t0, decode_s=t2 - t1, text=text)


def _implements_engine(engine: TransformersEngine) -> Engine:
    return engine  # mypy checks TransformersEngine against the Engine protocol here
