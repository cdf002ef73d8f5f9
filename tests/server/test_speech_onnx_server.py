"""The article's set-up: an INT8 ONNX CTC Conformer (exported from the tiny Parakeet by `export_speech_dir`) served
with `--speech-model FILE.onnx`; its transcripts over HTTP equal the same file run in-process (onnxruntime)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from autoglm.multimodal.audio import decode_audio
from tests.fixtures.conformer import tone_clip
from tests.fixtures.server import ServerProcess, start_server
from tests.fixtures.speech import wav_bytes

pytest.importorskip("onnx", reason="onnx (export / quantization) is not installed")


@pytest.fixture(scope="module")
def int8_onnx(parakeet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from autoglm.quant.speech_onnx import export_speech_dir

    root = tmp_path_factory.mktemp("speech_onnx")
    export_speech_dir(parakeet_dir, root / "speech_conformer.onnx")
    return root / "speech_conformer.int8.onnx"


@pytest.fixture(scope="module")
def onnx_server(tiny_glm4v_dir: Path, int8_onnx: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    handle = start_server(tiny_glm4v_dir, tmp_path_factory.mktemp("onnx_server"), "--speech-model", str(int8_onnx),
                          "--max-model-len", "512", speech=True)
    yield handle
    handle.stop()


def test_int8_onnx_module_serves_transcriptions(onnx_server: ServerProcess, int8_onnx: Path) -> None:
    from autoglm.speech.conformer import load_conformer

    line = next(li for li in onnx_server.log().splitlines() if "Loaded module speech:" in li)
    assert str(int8_onnx) in line and "onnx int8" in line
    client = openai.OpenAI(base_url=onnx_server.v1, api_key="EMPTY", max_retries=0, timeout=120)
    oracle = load_conformer(int8_onnx)[0]
    for seed, seconds in ((1, 2.0), (2, 20.0)):  # one window, then overlapping windows
        data = wav_bytes(tone_clip(seconds, seed=seed), 16_000)
        out = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data))
        assert out.text == oracle.transcribe(decode_audio(data)).text
