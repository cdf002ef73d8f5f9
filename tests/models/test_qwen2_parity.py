"""Qwen2 / Qwen2.5 (q/k/v bias) vs transformers on tiny random checkpoints, through the shared harness."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.harness import check_architecture, tiny_checkpoint

CONFIGS = [
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         tie_word_embeddings=True, rope_theta=1e6),
    dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=1),
]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=["tied", "mqa"])
def test_qwen2_matches_transformers(tmp_path: Path, config: dict) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    check_architecture(tiny_checkpoint(Qwen2ForCausalLM, Qwen2Config, tmp_path, **config), Qwen2ForCausalLM)
