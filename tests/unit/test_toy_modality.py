"""The modality seam: a toy "sensor" encoder, defined only here, goes through the production request path.

The encoder declares its content-part type, placeholder and slots; prompt assembly routes the part to it, the
engine expands, positions (a 1-D span: no grid), encodes once per item, prefix-hashes its content, and health checks
its sample — with no production file knowing the modality. Oracle: the same decoder run directly on the prompt
with the sensor rows written into its input embeddings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from autoglm import LLM
from autoglm.config import EngineConfig
from autoglm.engine.engine import Engine
from autoglm.engine.prompt import assemble_prompt, media_parts
from autoglm.engine.sampling_params import SamplingParams
from autoglm.errors import UnsupportedModality
from autoglm.layers.attention import AttentionContext
from autoglm.loader import load_model
from autoglm.models.loaded import LoadedModel
from autoglm.multimodal.encoder import Encoder, EncoderInputs
from autoglm.multimodal.media import MediaPolicy
from autoglm.server.health import HealthChecker

PLACEHOLDER = "<|observation|>"  # any token of the tiny vocabulary serves as this toy's placeholder


class SensorEncoder:
    """A reading of n floats -> n decoder slots (row i: a fixed direction scaled by reading i)."""

    modality = "sensor"
    module_name = "sensor"
    part_types = ("sensor_data",)
    placeholder = PLACEHOLDER

    def __init__(self, placeholder_id: int, hidden: int) -> None:
        self.placeholder_id = placeholder_id
        self.direction = torch.linspace(-1.0, 1.0, hidden)  # [D]
        self.device = torch.device("cpu")

    def load(self, part: Mapping[str, Any], policy: MediaPolicy | None) -> Any:
        return part.get("sensor_data")

    def preprocess(self, media: Any) -> EncoderInputs:
        values = torch.tensor([float(v) for v in media])  # [n]
        digest = hashlib.sha256(values.numpy().tobytes()).hexdigest()
        return EncoderInputs("sensor", {"values": values}, (len(values),), len(values), digest)

    def encode(self, inputs: EncoderInputs) -> Tensor:
        return inputs.data["values"][:, None] * self.direction[None, :]  # [n, D]

    def sample(self) -> Any:
        return [0.5, -0.5]


@pytest.fixture(scope="module")
def sensed(tiny_glm4_dir: Path) -> tuple[LoadedModel, SensorEncoder]:
    base = load_model(tiny_glm4_dir)
    enc = SensorEncoder(base.tokenizer.token_to_id(PLACEHOLDER), base.decoder.hidden_size)
    assert isinstance(enc, Encoder)  # the protocol, structurally
    return dataclasses.replace(base, encoders={"sensor": enc}), enc


def _ids(model: LoadedModel, enc: SensorEncoder, n_items: int) -> list[int]:
    tok = model.tokenizer
    ids = tok.encode("reading:", add_special_tokens=False)
    for _ in range(n_items):
        ids += [enc.placeholder_id, *tok.encode(" then", add_special_tokens=False)]
    return ids


def _direct_logits(model: LoadedModel, enc: SensorEncoder, ids: list[int], readings: list[list[float]]) -> Tensor:
    """Oracle: the decoder alone on the expanded prompt, sensor rows written at the slots, positions 0..L-1."""
    expanded: list[int] = []
    rows: list[tuple[int, Tensor]] = []
    k = 0
    for t in ids:
        if t == enc.placeholder_id:
            rows.append((len(expanded), enc.encode(enc.preprocess(readings[k]))))
            expanded += [t] * len(readings[k])
            k += 1
        else:
            expanded.append(t)
    x = torch.tensor(expanded)
    with torch.no_grad():
        embeds = model.decoder.embed_tokens(x)
        for at, r in rows:
            embeds[at : at + r.shape[0]] = r
        hidden = model.decoder(x, torch.arange(len(expanded)), AttentionContext.no_cache([len(expanded)]), embeds)
        return model.decoder.compute_logits(hidden)


def test_parts_are_routed_by_declared_type(sensed: tuple[LoadedModel, SensorEncoder]) -> None:
    model, enc = sensed
    messages = [{"role": "user", "content": [{"type": "sensor_data", "sensor_data": [1.0, 2.0]},
                                             {"type": "text", "text": "what changed?"}]}]
    (part,) = media_parts(model, messages)
    assert part.encoder is enc and part.where == "messages[0].content[0]"
    text_only = dataclasses.replace(model, encoders={})
    with pytest.raises(UnsupportedModality, match="'sensor_data' part"):
        media_parts(text_only, messages)


def test_assembly_expands_to_declared_slots(sensed: tuple[LoadedModel, SensorEncoder]) -> None:
    model, enc = sensed
    ids = _ids(model, enc, 2)
    prompt = assemble_prompt(ids, [(enc, [1.0, 2.0, 3.0]), (enc, [4.0])])
    assert len(prompt.token_ids) == len(ids) - 2 + 4
    assert [(s.length, s.grid) for s in prompt.spans] == [(3, ()), (1, ())]
    assert all(prompt.token_ids[s.offset + i] == enc.placeholder_id for s in prompt.spans for i in range(s.length))


def test_score_equals_direct_decoder(sensed: tuple[LoadedModel, SensorEncoder]) -> None:
    model, enc = sensed
    ids = _ids(model, enc, 2)
    readings = [[0.3, -1.2, 2.0], [0.7]]
    llm = LLM(model)
    ours = llm.score(ids, media=readings)
    expect = _direct_logits(model, enc, ids, readings)
    assert ours.shape == expect.shape
    assert (ours - expect).abs().max() <= 1e-5 * expect.abs().max()


def test_engine_encodes_once_and_prefix_hashes_content(sensed: tuple[LoadedModel, SensorEncoder]) -> None:
    model, enc = sensed
    ids = _ids(model, enc, 1) * 6  # long enough for full KV blocks after the reading
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.0, max_tokens=4, ignore_eos=True)
    engine = Engine(model, EngineConfig(num_kv_blocks=64, block_size=4, enable_prefix_caching=True,
                                        encoder_cache_memory=0))

    def run(rid: str, reading: list[float]) -> list[int]:
        engine.add_request(rid, assemble_prompt(ids, [(enc, reading)] * 6), greedy)
        out: list[int] = []
        while engine.has_unfinished():
            out += [t for o in engine.step() for t in o.new_token_ids]
        return out

    first = run("a", [1.0, 2.0])
    assert engine.stats()["encoder_runs"] == 6  # one call per item
    assert run("b", [1.0, 2.0]) == first  # same content: prefix hit, same tokens
    hits = engine.stats()["prefix_cache_hit_tokens"]
    assert hits > 0
    run("c", [9.0, 2.0])  # other content under the same ids: only blocks wholly before the first reading match
    before = assemble_prompt(ids, [(enc, [9.0, 2.0])] * 6).spans[0].offset
    assert engine.stats()["prefix_cache_hit_tokens"] - hits <= before // 4 * 4


def test_health_probes_the_encoder_sample(sensed: tuple[LoadedModel, SensorEncoder]) -> None:
    model, enc = sensed
    checker = HealthChecker(model, engine=None)  # type: ignore[arg-type]  # only the encoder probe runs
    result = asyncio.run(checker._probe_encoder(enc))
    assert result.ok and result.name == "sensor" and "(2, " in result.detail
