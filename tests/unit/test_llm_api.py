"""autoglm.LLM end to end on the tiny random checkpoints, compared with transformers computed here."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from autoglm import LLM
from autoglm.engine.async_engine import AsyncEngine
from autoglm.engine.engine import Engine
from autoglm.engine.prompt import assemble_prompt, build_chat_prompt, build_text_prompt
from autoglm.engine.sampling_params import SamplingParams
from autoglm.errors import InvalidRequest, MissingProjector, UnsupportedModality
from autoglm.llm import LOCAL_MEDIA

GREEDY = dict(temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
MESSAGES = [{"role": "system", "content": "You are a phone agent."}, {"role": "user", "content": "Open Chrome"}]


@pytest.fixture(scope="module")
def llm(tiny_glm4_dir: Path) -> LLM:
    return LLM(str(tiny_glm4_dir), block_size=4)


@pytest.fixture(scope="module")
def hf_glm4(tiny_glm4_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_glm4_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vlm(tiny_glm4v_dir: Path) -> LLM:
    return LLM(tiny_glm4v_dir, block_size=4)


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def test_tokenize_detokenize_match_transformers(llm: LLM, tiny_glm4_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_glm4_dir)
    for text in ["Hello world", "你好，世界 😀", "<|user|>\nhi"]:
        assert llm.tokenize(text) == hf.encode(text)
        assert llm.tokenize(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        assert llm.detokenize(llm.tokenize(text)) == hf.decode(hf.encode(text))


def test_chat_greedy_matches_transformers(llm: LLM, hf_glm4: torch.nn.Module, tiny_glm4_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tiny_glm4_dir)
    ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"]) if isinstance(ids, dict) else list(ids)
    out = llm.chat(MESSAGES, max_tokens=12, **GREEDY)
    ref = hf_glm4.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                           repetition_penalty=1.0, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert out.token_ids == ref
    assert out.usage == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12,
                         "reasoning_tokens": out.usage["reasoning_tokens"]}
    assert out.finish_reason == "length"
    # text + reasoning are the decoded tokens with the think/answer tags dropped
    assert out.text + out.reasoning != "" or out.token_ids


def test_generate_stream_and_batch_agree(llm: LLM) -> None:
    prompts = ["The quick brown fox", "打开微信", "def add(a, b):"]
    singles = [llm.generate(p, max_tokens=10, **GREEDY) for p in prompts]
    batch = llm.generate(prompts, max_tokens=10, **GREEDY)
    assert [r.token_ids for r in batch] == [r.token_ids for r in singles]
    deltas = list(llm.stream(prompts[0], max_tokens=10, **GREEDY))
    assert [t for d in deltas for t in d.token_ids] == singles[0].token_ids
    assert "".join(d.text for d in deltas) == singles[0].text
    assert deltas[-1].finished and deltas[-1].usage == singles[0].usage
    assert all(not d.finished for d in deltas[:-1])
    # token-id prompt == string prompt
    ids = llm.tokenize(prompts[0])
    assert llm.generate(ids, max_tokens=10, **GREEDY).token_ids == singles[0].token_ids
    # chat stream == chat
    chat = llm.chat(MESSAGES, max_tokens=8, **GREEDY)
    streamed = list(llm.stream(MESSAGES, max_tokens=8, **GREEDY))
    assert [t for d in streamed for t in d.token_ids] == chat.token_ids
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_two_streams_interleaved_in_one_thread(llm: LLM) -> None:
    a_ref = llm.generate("alpha beta", max_tokens=6, **GREEDY).token_ids
    b_ref = llm.generate("gamma", max_tokens=9, **GREEDY).token_ids
    sa, sb = llm.stream("alpha beta", max_tokens=6, **GREEDY), llm.stream("gamma", max_tokens=9, **GREEDY)
    a, b = [], []
    for da, db in zip(sa, sb, strict=False):
        a += da.token_ids
        b += db.token_ids
    b += [t for d in sb for t in d.token_ids]
    assert a == a_ref and b == b_ref
    # a stream closed early frees its blocks
    s = llm.stream("alpha beta", max_tokens=50, **GREEDY)
    next(s)
    s.close()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks and not llm.engine.has_unfinished()


def test_score_equals_transformers_logits(llm: LLM, hf_glm4: torch.nn.Module) -> None:
    text = "Open Chrome and tap the search bar 你好"
    ours = llm.score(text)
    ids = llm.tokenize(text, add_special_tokens=False)
    assert ours.shape == (len(ids), hf_glm4.config.vocab_size) and ours.dtype == torch.float32
    with torch.no_grad():
        ref = hf_glm4(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    torch.testing.assert_close(llm.score(ids), ours)


def test_score_with_images_equals_transformers(vlm: LLM, tiny_glm4v_dir: Path) -> None:
    from transformers import Glm4vForConditionalGeneration

    hf = Glm4vForConditionalGeneration.from_pretrained(tiny_glm4v_dir, dtype=torch.float32).eval()
    images = [_image(60, 90, 1), _image(120, 56, 2)]
    text = ("[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>look "
            "<|begin_of_image|><|image|><|end_of_image|>Open Chrome<|assistant|>\n")
    ours = vlm.score(text, images=images)
    enc = vlm.model.encoders["image"]
    inputs = [enc.preprocess(im) for im in images]
    prompt = assemble_prompt(vlm.tokenize(text, add_special_tokens=False), [(enc, im) for im in images])
    assert ours.shape[0] == len(prompt.token_ids)
    with torch.no_grad():
        x = torch.tensor([prompt.token_ids])
        ref = hf(
            input_ids=x,
            mm_token_type_ids=(x == hf.config.image_token_id).int(),
            pixel_values=torch.cat([i.data["pixel_values"] for i in inputs]),
            image_grid_thw=torch.tensor([list(i.grid) for i in inputs]),
        ).logits[0].float()
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_chat_with_image_greedy_matches_transformers(vlm: LLM, tiny_glm4v_dir: Path, tmp_path: Path) -> None:
    from transformers import Glm4vForConditionalGeneration

    hf = Glm4vForConditionalGeneration.from_pretrained(tiny_glm4v_dir, dtype=torch.float32).eval()
    img = _image(84, 112, 3)
    path = tmp_path / "screen.png"
    img.save(path)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                             {"type": "text", "text": "Open Chrome"}]}]
    out = vlm.chat(messages, max_tokens=10, **GREEDY)
    prompt = build_chat_prompt(vlm.model, messages, media_policy=LOCAL_MEDIA)
    assert "<|end_of_image|>\nOpen Chrome" in (prompt.text or "")  # AutoGLM "string" content format
    assert out.usage["prompt_tokens"] == len(prompt.token_ids) > prompt.media[0].n_slots
    inp = prompt.media[0].inputs
    x = torch.tensor([prompt.token_ids])
    ref = hf.generate(
        input_ids=x,
        mm_token_type_ids=(x == hf.config.image_token_id).int(),
        pixel_values=inp.data["pixel_values"],
        image_grid_thw=torch.tensor([list(inp.grid)]),
        max_new_tokens=10, min_new_tokens=10, do_sample=False, repetition_penalty=1.0, eos_token_id=None,
        pad_token_id=0,
    )[0, len(prompt.token_ids):].tolist()
    assert out.token_ids == ref
    # with a text-only batch mate, chunked: same tokens
    small = LLM(vlm.model, block_size=4, max_num_batched_tokens=7)
    mate = [{"role": "user", "content": "hi"}]
    results = small.chat([messages, mate], max_tokens=10, **GREEDY)
    assert results[0].token_ids == ref


def test_images_without_vision(llm: LLM) -> None:
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                         {"type": "text", "text": "hi"}]}]
    with pytest.raises(UnsupportedModality):
        llm.chat(msgs)
    missing = dataclasses.replace(llm.model, missing_projector="Missing mmproj file for vision encoder projection")
    with pytest.raises(MissingProjector, match="mmproj"):
        build_chat_prompt(missing, msgs)


def test_enable_thinking_false_prefills_empty_think(llm: LLM) -> None:
    on = build_chat_prompt(llm.model, MESSAGES)
    off = build_chat_prompt(llm.model, MESSAGES, enable_thinking=False)
    assert not llm.model.chat_template.supports_enable_thinking
    assert off.text == (on.text or "") + "<think></think>"
    off2 = build_chat_prompt(llm.model, MESSAGES, chat_template_kwargs={"enable_thinking": False})
    assert off2.token_ids == off.token_ids
    # a prompt ending in <think></think> starts in content: nothing is reasoning
    out = llm.chat(MESSAGES, enable_thinking=False, max_tokens=6, **GREEDY)
    assert out.reasoning == "" and out.usage["reasoning_tokens"] == 0
    with pytest.raises(InvalidRequest):
        build_chat_prompt(llm.model, [])


def test_sampling_kwargs_validated(llm: LLM) -> None:
    with pytest.raises(InvalidRequest, match="unknown sampling parameter"):
        llm.generate("hi", temprature=0.5)
    with pytest.raises(InvalidRequest, match="unknown engine option"):
        LLM(llm.model, max_num_seq=3)


def test_async_engine_generate_and_cancel(tiny_glm4_dir: Path, llm: LLM) -> None:
    ref = llm.generate("The quick brown fox", max_tokens=8, **GREEDY).token_ids
    engine = AsyncEngine(Engine(llm.model, llm.config))
    model = llm.model

    async def main() -> None:
        params = SamplingParams(max_tokens=8, **GREEDY)  # type: ignore[arg-type]

        async def collect(rid: str) -> list[int]:
            ids: list[int] = []
            async for out in engine.generate(rid, build_text_prompt(model, "The quick brown fox"), params):
                ids += out.new_token_ids
            return ids

        results = await asyncio.gather(*(collect(f"r{i}") for i in range(3)))
        assert results == [ref] * 3
        # cancel mid-stream: blocks free at once
        agen = engine.generate("long", build_text_prompt(model, "The quick"), SamplingParams(max_tokens=400, **GREEDY))
        await agen.__anext__()
        await agen.aclose()
        for _ in range(100):
            if engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats()["kv_blocks_used"] == 0
        with pytest.raises(InvalidRequest):  # validation errors raise in the caller
            engine.add_request("bad", build_text_prompt(model, [10**7]), params)

    try:
        asyncio.run(main())
        assert engine.stats()["requests_finished"] >= 3 and engine.stats()["requests_aborted"] >= 1
    finally:
        engine.shutdown()
    assert not engine.is_alive()


def test_prefix_cache_tells_images_apart(vlm: LLM) -> None:
    def msgs(img: Image.Image) -> list[dict[str, object]]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                             {"type": "text", "text": "Open Chrome"}]}]

    a, b = _image(84, 112, 7), _image(84, 112, 8)  # same size: same slot tokens, different content
    ref_a = vlm.chat(msgs(a), max_tokens=8, **GREEDY).token_ids
    ref_b = vlm.chat(msgs(b), max_tokens=8, **GREEDY).token_ids
    cached = LLM(vlm.model, block_size=4, enable_prefix_caching=True)
    assert cached.chat(msgs(a), max_tokens=8, **GREEDY).token_ids == ref_a
    hits = cached.engine.scheduler.num_cached_tokens
    assert cached.chat(msgs(a), max_tokens=8, **GREEDY).token_ids == ref_a
    assert cached.engine.scheduler.num_cached_tokens > hits  # the whole image prefix was reused
    hits = cached.engine.scheduler.num_cached_tokens
    assert cached.chat(msgs(b), max_tokens=8, **GREEDY).token_ids == ref_b
    # only the blocks before the image can be shared with a different image
    n_before = build_chat_prompt(vlm.model, msgs(b)).media[0].offset
    assert cached.engine.scheduler.num_cached_tokens - hits <= n_before
