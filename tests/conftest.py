"""Shared test set-up. Tiny fixtures are generated once per test session by the modules in tests/fixtures/."""

from __future__ import annotations

import os

import torch

# 2-core CI machine: keep each test process on a bounded number of threads.
torch.set_num_threads(int(os.environ.get("AUTOGLM_TEST_THREADS", "2")))

pytest_plugins = [
    "tests.fixtures.tokenizer",
    "tests.fixtures.models",
    "tests.fixtures.gguf",
    "tests.fixtures.server",
    "tests.fixtures.default_server",
    "tests.fixtures.conformer",
]
