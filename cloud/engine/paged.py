"""`PagedEngine`: the engine path made for the GPU (work in progress: for now the row engine).

Part of `cloud.engine`, the package that alone imports torch and transformers.
"""

from __future__ import annotations

from cloud.engine.steps import TransformersEngine


class PagedEngine(TransformersEngine):
    """Same constructor and `load()` as `TransformersEngine`."""

    kind = "paged"
