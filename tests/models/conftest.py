"""Every test here is model-driven (tiny checkpoints vs transformers, real GGUF files): marked `model`, so
`pytest -m "not model"` is the fast subset and `-m model` runs just these."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/models/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.model)
