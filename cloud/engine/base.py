"""`EngineBase`: what both engine paths share: the memory plan, tokenizing and planning a
call, the session cache's policy, starting a run, sampling, and the prefill rate.

Part of `cloud.engine`, the package that alone imports torch and transformers. The paths
(`--engine`) differ in where KV lives and how a step runs: `cloud.engine.steps`
(`TransformersEngine`, rows) and `cloud.engine.paged` (`PagedEngine`). Knows nothing about
gRPC, auth, deltas or the policy: text in, text out.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Self

import torch

from cloud import memory
from cloud.batching import StepRun, own
from cloud.decoding import IncrementalDetokenizer, TextOutput
from cloud.engine.kv import common_prefix, crop, free_bytes, model_shape, weights_bytes
from cloud.engine.sampling import fresh_seed, sample_rows
from cloud.engine.weights import load_weights
from cloud.engine_api import (
    CacheStats,
    EngineContextFull,
    EngineInfo,
    GenerateRequest,
    Run,
    ShouldStop,
)
from cloud.session_cache import CachedSession, SessionCaches
from shared.prompting import join_prompt, plain_prompt
from shared.wire import Message, Sampling

# Prompt tokens handed to the detokenizer as context, so the first generated token
# decodes with the right leading space / byte merges.
_DETOK_CONTEXT = 6
# While other calls decode, a prefill chunk is sized to take about this long on this
# machine (their next token waits for it, and the edge calls a stream that is silent
# for 5 s stalled), from the measured prefill speed; before the first measurement,
# _SHARING_CHUNK tokens. Never under _MIN_CHUNK tokens.
_SHARING_TARGET_S = 2.0
_SHARING_CHUNK = 128
_MIN_CHUNK = 16


class EngineBase:
    """An engine path's common part; build a path with its class's `load()`."""

    kind = ""  # --engine name

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        device: torch.device,
        loaded_from: str,
        converted_from: Path | None = None,
        max_cache_bytes: int | None = None,
        session_ttl_s: float = 600.0,
        prefill_chunk: int = 512,
        context_length: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_running: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.loaded_from = loaded_from  # the folder or hub id actually read
        self.converted_from = converted_from  # the GGUF file, when loaded_from is its conversion
        self.load_s = 0.0
        self.peak_host_bytes = 0  # the process's peak RSS after loading (set by load())
        self.session_ttl_s = session_ttl_s
        self.prefill_chunk = max(1, prefill_chunk)
        self.sharing_target_s = _SHARING_TARGET_S
        self._prefill_rate: float | None = None  # prefill tokens/s, smoothed

        self.config = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        model_ctx = int(getattr(self.config, "max_position_embeddings", 0) or 0) or 2048
        context = min(context_length, model_ctx) if context_length else model_ctx
        shape = model_shape(self.config, model.dtype)
        self.memory = memory.plan(
            device=device.type,
            free_bytes=free_bytes(device),
            bytes_per_token=shape.bytes_per_token,
            context_length=context,
            budget_bytes=max_cache_bytes,
            max_running=max_running,
            weights_bytes=weights_bytes(model),
            reserve_bytes=memory.step_reserve_bytes(
                shape,
                prefill_chunk=self.prefill_chunk,
                max_rows=max_running or memory.MAX_RUNNING_CAP,
                context_length=context,
                device=device.type,
            ),
            slot_tokens=self._slot_tokens(context, chosen=context_length is not None),
        )
        self.context_length = self.memory.context_length
        self.caches = self._session_caches(session_ttl_s, clock)
        template = getattr(tokenizer, "chat_template", None)
        self.info = EngineInfo(
            model_id=model_id,
            tokenizer=type(tokenizer).__name__,
            context_length=self.context_length,
            device=str(device),
            dtype=str(model.dtype).removeprefix("torch."),
            chat_template=bool(template),
            max_running=self.memory.max_running,
            engine=self.kind,
        )
        self._eos = self._eos_ids()
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ---- what an engine path keeps per session (its subclass says) --------------------

    def _slot_tokens(self, context: int, chosen: bool) -> int:
        """Tokens per preallocated slot (0: none; sessions hold caches that grow), for a
        context of `context` tokens (`chosen`: by --context-length, else the model's)."""
        return 0

    def _session_caches(self, ttl_s: float, clock: Callable[[], float]) -> SessionCaches:
        raise NotImplementedError

    @classmethod
    def load(
        cls,
        model: str,
        device: str = "auto",
        cache_dir: Path | None = None,
        max_cache_bytes: int | None = None,
        session_ttl_s: float = 600.0,
        prefill_chunk: int = 512,
        clock: Callable[[], float] = time.monotonic,
        *,
        context_length: int | None = None,
        num_threads: int | None = None,
        max_running: int | None = None,
        dtype: str = "auto",
        tp_plan: Literal["auto"] | None = None,
    ) -> Self:
        """Load a Hugging Face folder, hub id or `.gguf` file (converted once, then cached)
        with `cloud.engine.weights.load_weights`, whose ValueErrors (one line each) it raises.
        With `tp_plan`, this process's shard of a tensor-parallel model (under torchrun)."""
        t0 = time.perf_counter()
        if num_threads:
            torch.set_num_threads(num_threads)
        w = load_weights(model, device, dtype, cache_dir, tp_plan=tp_plan)
        engine = cls(
            w.model,
            w.tokenizer,
            model_id=model,
            device=w.device,
            loaded_from=w.loaded_from,
            converted_from=w.converted_from,
            max_cache_bytes=max_cache_bytes,
            session_ttl_s=session_ttl_s,
            prefill_chunk=prefill_chunk,
            context_length=context_length,
            clock=clock,
            max_running=max_running,
        )
        engine.load_s = time.perf_counter() - t0
        engine.peak_host_bytes = w.peak_host_bytes
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

    @property
    def max_cache_bytes(self) -> int:
        return self.caches.budget_bytes

    @max_cache_bytes.setter
    def max_cache_bytes(self, value: int) -> None:
        self.caches.budget_bytes = value

    def drop(self, session: str) -> bool:
        return self.caches.drop(session)

    def cache_stats(self) -> CacheStats:
        return self.caches.stats()

    def _reuse(self, s: CachedSession, prompt: list[int], at_most: int) -> int:
        """Crop the session to its longest common token prefix with `prompt`, and to
        `at_most` tokens (the positions whose logits a call needs must be computed);
        returns how many prompt tokens are re-used."""
        keep = min(common_prefix(s.ids, prompt), at_most)
        crop(s.cache, keep)
        del s.ids[keep:]
        self.caches.count_reuse(keep)
        return keep

    # ---- planning a call (the caller's thread) ----------------------------------------

    def _check_fits(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("empty prompt: nothing to continue")
        if len(prompt) > self.context_length:
            raise EngineContextFull(
                f"prompt is {len(prompt)} tokens; the context window is {self.context_length}"
            )

    def plan_generate(self, request: GenerateRequest, should_stop: ShouldStop) -> StepRun:
        prompt = self.tokenize(request.messages, request.assistant_text)
        self._check_fits(prompt)
        output = TextOutput(
            IncrementalDetokenizer(self.tokenizer, prompt[-_DETOK_CONTEXT:]),
            max_tokens=request.max_tokens,
            stop=request.stop,
            eos=self._eos,
            room=self.context_length - len(prompt),
        )
        sampling = request.sampling
        seed = sampling.seed if sampling.seed is not None else fresh_seed()
        return StepRun(request.session, prompt, should_stop, output, sampling, seed)

    def plan_prefill(self, request: GenerateRequest, should_stop: ShouldStop) -> StepRun:
        """A prefill; with a `probe`, of the text and the probe, scoring the probe's tokens:
        those after the longest common prefix of the text's tokens alone and the text's
        with the probe's (a token that spans the seam is scored too)."""
        text = request.assistant_text
        prompt = self.tokenize(request.messages, text + request.probe)
        self._check_fits(prompt)
        run = StepRun(request.session, prompt, should_stop, None, Sampling(), 0)
        if request.probe:
            head = self.tokenize(request.messages, text)
            run.score_from = max(1, min(common_prefix(head, prompt), len(prompt)))
        return run

    # ---- the phases both paths share (the engine thread) ------------------------------

    def start(self, run: Run) -> None:
        """Check the session's cache out; keep the longest common prefix."""
        run = own(run)
        run.t0 = time.perf_counter()
        run.s = self.caches.checkout(run.session)
        # sampling needs the last position's logits, scoring those before each probe token
        at_most = len(run.prompt) - 1 if run.output is not None else len(run.prompt)
        if run.score_from is not None:
            at_most = min(at_most, run.score_from - 1)
        run.cached = self._reuse(run.s, run.prompt, at_most)
        if not run.prefilling:
            run.t1 = time.perf_counter()

    def _advance(self, run: StepRun, token: int) -> None:
        """A sampled token becomes the run's next (pending) token; its output decides
        whether the call goes on (it sets `finish` when not)."""
        assert run.output is not None
        run.output.push(token)
        run.pending = token
        run.output.wants_token()

    def _pick_rows(self, runs: Sequence[StepRun], logits: torch.Tensor) -> list[int]:
        """One token per row of [rows, vocab] logits, sampled together on their device
        (`cloud.engine.sampling`); one host sync for all."""
        tokens = sample_rows(
            logits, [r.sampling for r in runs], [r.seed for r in runs], [r.draws for r in runs]
        )
        for r in runs:
            r.draws += 1
        return [int(t) for t in tokens.tolist()]

    def _scored(self, run: StepRun, start: int, n: int) -> int:
        """Logits a chunk of `run`'s prompt (positions start..start+n-1) must keep, counted
        from its end: 1 (its last position, for sampling), or from the first position that
        predicts a probe token on (a judged prefill)."""
        if run.score_from is None:
            return 1
        first = max(start, run.score_from - 1)
        return max(1, start + n - first) if first < len(run.prompt) - 1 else 1

    def _score(self, run: StepRun, end: int, logits: torch.Tensor) -> None:
        """Record the log-probabilities of the probe tokens that `logits` ([k, vocab], the
        positions end-k..end-1 of the prompt) predict."""
        if run.score_from is None:
            return
        first = end - logits.shape[0]
        at = [
            i
            for i in range(logits.shape[0])
            if run.score_from - 1 <= first + i < len(run.prompt) - 1
        ]
        if not at:
            return
        targets = torch.tensor([run.prompt[first + i + 1] for i in at], device=logits.device)
        rows = torch.log_softmax(logits[at].float(), dim=-1)
        run.logprobs.extend(rows.gather(1, targets.unsqueeze(1)).squeeze(1).tolist())

    @property
    def sharing_chunk(self) -> int:
        """Prefill tokens per step while others decode: about `sharing_target_s` of work."""
        if self._prefill_rate is None:
            return min(self.prefill_chunk, _SHARING_CHUNK)
        chunk = int(self._prefill_rate * self.sharing_target_s)
        return max(_MIN_CHUNK, min(self.prefill_chunk, chunk))

    def _measure_prefill(self, tokens: int, seconds: float) -> None:
        if tokens < _MIN_CHUNK or seconds <= 0:
            return  # a few tokens measure the fixed cost of a forward, not the speed
        rate = tokens / seconds
        self._prefill_rate = (
            rate if self._prefill_rate is None else 0.7 * self._prefill_rate + 0.3 * rate
        )


def wants_token(run: StepRun) -> bool:
    """A generate run (not a prefill) whose output asks for another token."""
    return run.output is not None and run.output.wants_token()
