"""Qwen3 (per-head q/k RMSNorm, explicit head_dim) vs transformers on tiny random checkpoints, via the harness."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.harness import check_architecture, tiny_checkpoint

CONFIGS = [
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         head_dim=32, tie_word_embeddings=True),
    dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
         head_dim=16, attention_bias=True),
]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=["tied-wide-heads", "bias"])
def test_qwen3_matches_transformers(tmp_path: Path, config: dict) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    check_architecture(tiny_checkpoint(Qwen3ForCausalLM, Qwen3Config, tmp_path, **config), Qwen3ForCausalLM)
