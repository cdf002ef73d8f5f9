"""Llama (and Mistral-style) vs transformers on tiny random checkpoints, through the shared harness."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.harness import check_architecture, tiny_checkpoint

CONFIGS = [
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=6,
         tie_word_embeddings=True, rope_theta=500.0, attention_bias=True),
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
         head_dim=24, rope_scaling={"rope_type": "linear", "factor": 2.0}),
]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=["gqa", "tied-bias", "headdim-linear"])
def test_llama_matches_transformers(tmp_path: Path, config: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    check_architecture(tiny_checkpoint(LlamaForCausalLM, LlamaConfig, tmp_path, **config), LlamaForCausalLM)


def test_mistral_sliding_window_matches_transformers(tmp_path: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    path = tiny_checkpoint(MistralForCausalLM, MistralConfig, tmp_path, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=5)
    check_architecture(path, MistralForCausalLM)
