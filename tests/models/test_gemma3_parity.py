"""Gemma 3 text decoder vs transformers' Gemma3ForCausalLM on tiny random configs (float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoglm.layers.attention import AttentionContext
from autoglm.models.gemma3 import Gemma3Config, Gemma3ForCausalLM
from tests.models.harness import check_architecture, tiny_checkpoint

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # sliding/full mix with a window shorter than the prompts so the window matters
    "mixed": dict(
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        num_hidden_layers=3,
        sliding_window=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
    ),
    "mqa_softcap": dict(
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        final_logit_softcapping=30.0,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0},
        },
    ),
}


def _hf_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        max_position_embeddings=256,
        **CONFIGS[name],
    )
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    # random norm weights: HF initialises them to zero, which would hide a (1 + w) mistake
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)
    model.config._attn_implementation = "eager"
    return model


def _ours(hf: torch.nn.Module) -> Gemma3ForCausalLM:
    ours = Gemma3ForCausalLM(Gemma3Config.from_dict(hf.config.to_dict())).eval()
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours.load_state_dict(sd, strict=True)
    return ours


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, Gemma3ForCausalLM]:
    hf = _hf_model(request.param)
    return hf, _ours(hf)


def test_logits_match_uncached(pair: tuple[torch.nn.Module, Gemma3ForCausalLM]) -> None:
    hf, ours = pair
    ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits[0]
        got = ours.compute_logits(ours(ids[0], torch.arange(23), AttentionContext.no_cache([23])))
    assert ref.dtype == got.dtype == torch.float32
    err = (ref - got).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 1e-4 * scale, f"max |diff| {err} vs scale {scale}"


def test_two_sequences_packed_equal_alone(pair: tuple[torch.nn.Module, Gemma3ForCausalLM]) -> None:
    _, ours = pair
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 128, (9,), generator=g), torch.randint(0, 128, (14,), generator=g)
    with torch.no_grad():
        packed = ours(
            torch.cat([a, b]), torch.cat([torch.arange(9), torch.arange(14)]), AttentionContext.no_cache([9, 14])
        )
        alone_a = ours(a, torch.arange(9), AttentionContext.no_cache([9]))
        alone_b = ours(b, torch.arange(14), AttentionContext.no_cache([14]))
    torch.testing.assert_close(packed, torch.cat([alone_a, alone_b]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_harness_paged_cache_and_batched_greedy(tmp_path: Path, name: str) -> None:
    """The shared harness: load_hf'd checkpoint vs transformers, paged cache through the engine, batched greedy."""
    check_architecture(
        tiny_checkpoint(transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig, tmp_path, hidden_size=64,
                        intermediate_size=96, **CONFIGS[name]),
        transformers.Gemma3ForCausalLM,
    )


def test_hf_safetensors_directory_loads_through_the_registry(tmp_path: Path) -> None:
    import json

    from autoglm.gguf.reader import GGUFFile
    from autoglm.gguf.tokenizer import build_tokenizer
    from autoglm.loader.hf import load_hf
    from tests.fixtures.gguf import gemma3_to_gguf, tiny_gemma3_hf

    hf = tiny_gemma3_hf(3)
    hf.save_pretrained(tmp_path)  # transformers 5 spelling: per-layer-type rope_parameters
    g = gemma3_to_gguf(hf, tmp_path.parent / "tok.gguf")  # only for its tokenizer
    build_tokenizer(GGUFFile(g).metadata).backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    loaded = load_hf(tmp_path)
    assert isinstance(loaded.decoder, Gemma3ForCausalLM)
    ids = torch.tensor([2, 40, 283, 284, 285, 7, 301, 302, 12, 13, 14])
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        got = loaded.decoder.compute_logits(loaded.decoder(ids, torch.arange(11), AttentionContext.no_cache([11])))
    assert (ref - got).abs().max().item() <= 1e-4 * ref.abs().max().item()
