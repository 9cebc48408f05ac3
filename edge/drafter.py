"""The small model on the edge: llama.cpp through llama-cpp-python (the only module importing it).

`LlamaDrafter.draft` continues the assistant's text. Text is the truth: every call renders
the conversation with the model's chat template, appends the assistant text and
re-tokenizes it; llama.cpp's KV cache is re-used for the longest common token prefix, so
after a takeover only the tokens past that prefix are evaluated (`evaluated_prompt_tokens`
counts them).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.drafter_api import DraftToken
from shared.prompting import join_prompt, plain_prompt, think_prefix
from shared.wire import FINISH_CONTEXT_FULL, FINISH_STOP, Message, Sampling

GGUF_MAGIC = b"GGUF"
# at the token budget, a character whose bytes are incomplete is finished with at most this
# many more tokens (counted as written) rather than dropped
_FINISH_CHARACTER_TOKENS = 4


class DrafterError(Exception):
    """The model cannot be used; the message is one line for the CLI."""


@dataclass
class DraftCounters:
    calls: int = 0
    prompt_tokens: int = 0  # tokens of the rendered prompt, over all calls
    evaluated_prompt_tokens: int = 0  # of those, evaluated (not found in the KV cache)
    generated_tokens: int = 0
    last_evaluated: int = 0  # evaluated prompt tokens of the latest call
    prompt_eval_s: float = 0.0  # time spent evaluating those prompt tokens
    finishing_tokens: int = 0  # written past a budget to finish a character's bytes


def check_gguf(path: Path) -> None:
    """A one-line error for a missing file or one that is not GGUF, before llama.cpp."""
    if not path.exists():
        raise DrafterError(f"model file not found: {path}")
    if not path.is_file():
        raise DrafterError(f"model path is not a file: {path}")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise DrafterError(f"not a GGUF model file: {path}")


def default_threads() -> int:
    cpus = os.cpu_count() or 1
    return max(1, cpus // 2) if cpus > 4 else cpus


class Vocabulary:
    """A model's tokenizer and chat template: the text a conversation renders to, and its
    tokens. The loaded model's (`LlamaDrafter.vocab`), or one read alone from the file
    (`load_vocabulary`: no weights) to count a prompt before the model loads."""

    def __init__(self, model: Any, chat_template: str | None = None) -> None:
        """`model`: llama-cpp-python's model (`Llama._model`); `chat_template`: a Jinja
        template to use instead of the one the GGUF carries."""
        self._model = model
        try:
            metadata = model.metadata()
        except Exception:  # as llama-cpp-python's Llama: a model without readable metadata
            metadata = {}
        self.chat_template_text: str | None = (
            chat_template or metadata.get("tokenizer.chat_template") or None
        )
        self._template = self._chat_template()

    def close(self) -> None:
        """Free a vocabulary loaded alone (a drafter's is freed with its model)."""
        self._model.close()

    def _chat_template(self) -> Any | None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not self.chat_template_text:
            return None
        model = self._model
        return Jinja2ChatFormatter(
            template=self.chat_template_text,
            eos_token=model.token_get_text(model.token_eos()),
            bos_token=model.token_get_text(model.token_bos()),
        )

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def think_prefix(self) -> str:
        return think_prefix(self.chat_template_text)

    def render(self, messages: Sequence[Message]) -> str:
        if self._template is None:
            return plain_prompt(messages)
        chat = [{"role": m.role, "content": m.content} for m in messages]
        return str(self._template(messages=chat).prompt)

    def tokenize(self, messages: Sequence[Message], text: str) -> list[int]:
        prompt = self.render(messages)
        model = self._model
        bos_text = model.token_get_text(model.token_bos()) if model.token_bos() >= 0 else ""
        add_bos = model.add_bos_token() and not (bos_text and prompt.startswith(bos_text))
        joined = join_prompt(prompt, text)  # one <think>, whatever the template appends
        return list(model.tokenize(joined.encode("utf-8"), add_bos=add_bos, special=True))


def _runtime() -> Any:
    """llama_cpp, imported when first needed; a missing extra is one line."""
    try:
        import llama_cpp
    except ImportError:
        raise DrafterError(
            "the edge runtime is not installed: pip install 'specthink[edge]'"
        ) from None
    return llama_cpp


def load_vocabulary(model_path: str | Path) -> Vocabulary:
    """The tokenizer and chat template of a GGUF file without its weights (a fraction of a
    second, and of the memory, of loading the model)."""
    path = Path(model_path).expanduser()
    check_gguf(path)
    llama_cpp = _runtime()
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        model = LlamaModel(path_model=str(path), params=params, verbose=False)
    except Exception as exc:
        raise DrafterError(f"llama.cpp could not read the vocabulary of {path}: {exc}") from None
    return Vocabulary(model)


class LlamaDrafter:
    def __init__(
        self,
        model_path: str | Path,
        *,
        context_length: int = 8192,
        gpu_layers: int = 0,
        threads: int | None = None,
        seed: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        """`chat_template`: a Jinja template to use instead of the one the GGUF carries."""
        started = time.perf_counter()
        path = Path(model_path).expanduser()
        check_gguf(path)
        _runtime()  # one line if the extra is missing
        from llama_cpp import Llama

        drafter = self

        class _CountingLlama(Llama):  # type: ignore[misc]
            def eval(self, tokens: Sequence[int]) -> None:
                prompt = drafter._on_eval(len(tokens))
                started = time.perf_counter()
                super().eval(tokens)
                if prompt:
                    drafter.counters.prompt_eval_s += time.perf_counter() - started

        try:
            self.llm = _CountingLlama(
                model_path=str(path),
                n_ctx=context_length,
                n_gpu_layers=gpu_layers,
                n_threads=threads or default_threads(),
                seed=seed if seed is not None else 0xFFFFFFFF,
                verbose=False,
            )
        except Exception as exc:  # llama.cpp says little more than "failed to load"
            raise DrafterError(f"llama.cpp could not load {path}: {exc}") from None
        self.path = path
        self.counters = DraftCounters()
        self._first_eval_pending = False
        self._chat_template_override = chat_template
        self.n_ctx = self.llm.n_ctx()
        self.load_s = time.perf_counter() - started  # -v says it

    # -- prompt --

    @functools.cached_property
    def vocab(self) -> Vocabulary:
        """The loaded model's tokenizer and chat template."""
        return Vocabulary(self.llm._model, self._chat_template_override)

    @property
    def has_chat_template(self) -> bool:
        return self.vocab.has_chat_template

    @property
    def chat_template_text(self) -> str | None:
        """The model's Jinja chat template (as its GGUF carries it, unless overridden)."""
        return self.vocab.chat_template_text

    @property
    def think_prefix(self) -> str:
        """What this model's answers start with on the wire ("<think>\\n" for a reasoning
        model, see shared.prompting)."""
        return self.vocab.think_prefix

    @property
    def model_names(self) -> list[str]:
        """What the model calls itself (GGUF general.name / basename) and its file name."""
        meta = self.llm.metadata
        names = [meta.get("general.name", ""), meta.get("general.basename", ""), self.path.stem]
        return [n for n in names if n]

    def render(self, messages: Sequence[Message]) -> str:
        return self.vocab.render(messages)

    def tokenize(self, messages: Sequence[Message], text: str) -> list[int]:
        return self.vocab.tokenize(messages, text)

    # -- drafting --

    def _on_eval(self, n: int) -> bool:
        """Count the prompt tokens a draft call evaluates; True for that (first) eval."""
        if self._first_eval_pending:
            self._first_eval_pending = False
            self.counters.evaluated_prompt_tokens += n
            self.counters.last_evaluated = n
            return True
        return False

    def draft(
        self,
        messages: Sequence[Message],
        text: str,
        max_tokens: int,
        sampling: Sampling,
        *,
        uncertainty: bool = False,
    ) -> Generator[DraftToken, None, None]:
        import llama_cpp

        tokens = self.tokenize(messages, text)
        room = self.n_ctx - len(tokens)
        if room <= 0:
            yield DraftToken("", finish=FINISH_CONTEXT_FULL)
            return
        self.counters.calls += 1
        self.counters.prompt_tokens += len(tokens)
        self.counters.last_evaluated = 0
        self._first_eval_pending = True
        if sampling.seed is not None:
            self.llm.set_seed(sampling.seed + self.counters.calls)
        greedy = sampling.temperature <= 0
        vocab = self.llm._model.vocab
        pending = b""
        generator = self.llm.generate(
            tokens,
            temp=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=1 if greedy else (sampling.top_k or 0),
            min_p=0.0,
            repeat_penalty=1.0,
            reset=True,
        )
        try:
            for written, token in enumerate(generator):
                entropy = self._last_entropy() if uncertainty else None
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    yield DraftToken("", finish=FINISH_STOP, entropy=entropy)
                    return
                self.counters.generated_tokens += 1
                if written >= max_tokens:  # past the budget: finishing a started character
                    self.counters.finishing_tokens += 1
                pending += self.llm.detokenize([token], special=False)
                piece = _decode_complete(pending)
                if piece is not None:
                    pending = b""
                yield DraftToken(piece or "", entropy=entropy)
                if written + 1 >= max_tokens and (
                    not pending or written + 1 >= max_tokens + _FINISH_CHARACTER_TOKENS
                ):
                    return
                if written + 1 >= room:
                    yield DraftToken("", finish=FINISH_CONTEXT_FULL)
                    return
        finally:
            generator.close()

    def _last_entropy(self) -> float:
        """Entropy (nats) of the next-token distribution the latest token was drawn from:
        the logits llama.cpp computed last, at temperature 1, before any truncation."""
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1), shape=(self.llm.n_vocab(),)
        )
        return entropy_of_logits(logits)


def system_info() -> str:
    """What the installed llama.cpp was built with (its CPU features, backends)."""
    import llama_cpp

    return str(llama_cpp.llama_print_system_info().decode().strip())


def decode_probe(model_path: str, tokens: int) -> tuple[int, float]:
    """Greedy-decode `tokens` tokens of a fixed prompt with the bare runtime (no project
    code): how many came out, and in how many seconds. edge.selfcheck runs it in a child."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model_path, n_ctx=256, n_threads=1, verbose=False)
    prompt = llm.tokenize(b"The capital of France is", add_bos=True)
    started = time.perf_counter()
    decoded = 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        decoded += 1
        if decoded >= tokens:
            break
    return decoded, time.perf_counter() - started


def entropy_of_logits(logits: Any) -> float:
    """Shannon entropy (nats) of softmax(logits), computed stably in float64."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    p = np.exp(z)
    total = p.sum()
    return float(np.log(total) - (p * z).sum() / total)


def _decode_complete(data: bytes) -> str | None:
    """The text of `data` if it holds only whole UTF-8 characters, else None (wait)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.end == len(data) and len(data) - exc.start < 4:
            return None  # an incomplete multi-byte character at the end
        return data.decode("utf-8", errors="replace")
