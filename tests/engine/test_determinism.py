"""Deterministic greedy decoding (`EngineConfig.deterministic`): the same request gives the same token ids and the
same logprobs, bit for bit, alone, among 7 concurrent others (its prefill chunks sharing steps with their chunks and
decodes), with its prompt prefilled in chunks, and with its prefix served from the prefix cache — on the real
built-in GGUF (Qwen2.5-Coder-0.5B Q4_K_M, the CPU kernels) and on a tiny GLM-4.1V with an image (float32 dense
layers, the torch attention)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from autoglm.builtins import default_model_path
from autoglm.config import EngineConfig
from autoglm.engine.engine import Engine
from autoglm.engine.prompt import PromptInputs, build_chat_prompt
from autoglm.engine.sampling_params import SamplingParams
from autoglm.loader import load_model
from autoglm.models.loaded import LoadedModel

pytestmark = pytest.mark.model

Run = tuple[list[int], list[float]]  # token ids, their logprobs


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0)


def _run(model: LoadedModel, prompts: list[PromptInputs], n: int, **cfg: Any) -> list[Run]:
    """All prompts submitted together to one deterministic engine; each one's (ids, logprobs)."""
    engine = Engine(model, EngineConfig(deterministic=True, **cfg))
    assert engine.runner.backend.batch_invariant  # type: ignore[attr-defined]
    assert all(m.batch_invariant for m in model.decoder.modules() if hasattr(m, "set_batch_invariant"))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, _greedy(n))
    got: dict[str, Run] = {str(i): ([], []) for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id][0].extend(o.new_token_ids)
            got[o.request_id][1].extend(lp.logprob for lp in o.logprobs)
    engine.close()
    return [got[str(i)] for i in range(len(prompts))]


def _cached_then_again(model: LoadedModel, prompt: PromptInputs, n: int, **cfg: Any) -> tuple[Run, Run, int]:
    """The prompt twice, one after the other, with prefix caching: (first, second, tokens served from the cache)."""
    engine = Engine(model, EngineConfig(deterministic=True, enable_prefix_caching=True, **cfg))
    runs = []
    for name in ("first", "second"):
        engine.add_request(name, prompt, _greedy(n))
        ids: list[int] = []
        lps: list[float] = []
        while engine.has_unfinished():
            for o in engine.step():
                ids.extend(o.new_token_ids)
                lps.extend(lp.logprob for lp in o.logprobs)
        runs.append((ids, lps))
    cached = engine.scheduler.num_cached_tokens
    engine.close()
    return runs[0], runs[1], cached


def _check_all_cases(model: LoadedModel, prompts: list[PromptInputs], n: int, chunk: int) -> None:
    alone = _run(model, prompts[:1], n)[0]
    assert len(alone[0]) == n and len(alone[1]) == n
    # among 7 others with a small step budget: its prefill chunks share steps with the others' chunks and decodes
    cases = {
        f"prefill chunked by {chunk}": _run(model, prompts[:1], n, max_num_batched_tokens=chunk)[0],
        "among 7 concurrent others (chunked, mixed with decodes)": _run(
            model, prompts, n, max_num_batched_tokens=chunk
        )[0],
    }
    first, second, cached = _cached_then_again(model, prompts[0], n)
    assert cached > 0, "the second request must hit the prefix cache"
    cases["prefix uncached"] = first
    cases["prefix cached"] = second
    for name, run in cases.items():
        assert run[0] == alone[0], f"{name}: token ids differ from the request alone"
        assert run[1] == alone[1], f"{name}: logprobs differ (bitwise) from the request alone"


# --- the built-in GGUF ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin() -> LoadedModel:
    path = default_model_path()
    if not Path(path).exists():
        pytest.skip(f"the built-in model is not installed at {path}")
    return load_model(path)


@pytest.mark.timeout(1800)  # a 0.5B model over five engine runs on a shared 2-core machine
def test_builtin_gguf_greedy_is_batch_invariant(builtin: LoadedModel) -> None:
    system = "You are a phone agent. Read the screen, then answer with one action. " * 4
    tasks = ["open settings", "turn on wifi", "call mom", "read the last sms", "set an alarm for 7", "play music",
             "take a photo", "what is the battery level"]  # fmt: skip
    prompts = [
        build_chat_prompt(builtin, [{"role": "system", "content": system}, {"role": "user", "content": t}])
        for t in tasks
    ]
    assert len(prompts[0].token_ids) > 64
    _check_all_cases(builtin, prompts, n=10, chunk=24)


# --- a tiny GLM-4.1V with an image ---------------------------------------------------------------------------------
def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def test_tiny_glm4v_with_image_greedy_is_batch_invariant(tiny_glm4v_dir: Path) -> None:
    model = load_model(tiny_glm4v_dir)
    words = "open the settings app then tap wifi and read the network name aloud please".split()
    prompts = []
    for i in range(8):
        parts: list[dict[str, Any]] = []
        if i % 2 == 0:  # the first request (the one compared) has a screenshot
            parts.append({"type": "image_url", "image_url": {"url": _image(112 + 28 * (i % 3), 84, seed=i)}})
        parts.append({"type": "text", "text": " ".join(words[(i + k) % len(words)] for k in range(4 + 3 * i))})
        msgs = [{"role": "system", "content": "you drive a phone " * 8}, {"role": "user", "content": parts}]
        prompts.append(build_chat_prompt(model, msgs))
    assert prompts[0].media, "the compared request must carry an image"
    # chunks of 12 split the image's slots across steps
    _check_all_cases(model, prompts, n=12, chunk=12)
