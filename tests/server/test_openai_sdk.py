"""The official `openai` SDK against the live server (tiny GLM-4.1V): replies equal transformers' greedy output for
the same prompt, streaming equals non-streaming, image parts, logprobs, include_usage, and SDK error classes."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from tests.fixtures.server import MAX_MODEL_LEN, SERVED_NAMES, ServerProcess

N_NEW = 8
GREEDY = {"temperature": 0, "repetition_penalty": 1.0}  # plain greedy on both sides


def _png(w: int, h: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


class Reference:
    """transformers' model, tokenizer and image processor on the served checkpoint."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer, Glm4vForConditionalGeneration
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = Glm4vForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.images = Glm4vImageProcessorPil.from_pretrained(model_dir)
        self.eos = list(self.model.generation_config.eos_token_id)

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def greedy(self, ids: list[int], n: int, image: Image.Image | None = None) -> tuple[list[int], list[Any]]:
        """-> (generated ids up to and including the first EOS, per-step log-softmax rows)."""
        kwargs: dict[str, Any] = {}
        if image is not None:
            processed = self.images(images=[image], return_tensors="pt")
            grid = processed["image_grid_thw"]
            n_slots = int(grid.prod()) // 4
            image_id = self.tokenizer.convert_tokens_to_ids("<|image|>")
            at = ids.index(image_id)
            ids = ids[:at] + [image_id] * n_slots + ids[at + 1 :]
            kwargs = {"pixel_values": processed["pixel_values"], "image_grid_thw": grid}
        input_ids = torch.tensor([ids])
        if image is not None:  # transformers 5 locates image slots for M-RoPE through this mask
            kwargs["mm_token_type_ids"] = (input_ids == self.model.config.image_token_id).int()
        with torch.no_grad():
            out = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, do_sample=False,
                repetition_penalty=1.0, eos_token_id=self.eos, pad_token_id=self.eos[0], output_scores=True,
                return_dict_in_generate=True, **kwargs,
            )
        new = out.sequences[0, input_ids.shape[1] :].tolist()
        rows = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
        for i, t in enumerate(new):
            if t in self.eos:
                return new[: i + 1], rows[: i + 1]
        return new, rows

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t not in self.eos], skip_special_tokens=True)


@pytest.fixture(scope="module")
def ref(server: ServerProcess) -> Reference:
    assert server.model_dir is not None
    return Reference(server.model_dir)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="EMPTY", max_retries=0, timeout=120)


def test_models_lists_served_names(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == list(SERVED_NAMES)
    assert all(m.model_extra.get("max_model_len") == MAX_MODEL_LEN for m in models.data)


def test_chat_non_streaming_equals_transformers_greedy(client: openai.OpenAI, ref: Reference) -> None:
    messages = [{"role": "system", "content": "You are a phone agent."}, {"role": "user", "content": "你是谁?"}]
    expect_ids, _ = ref.greedy(ref.prompt_ids(messages), N_NEW)
    reply = client.chat.completions.create(model=SERVED_NAMES[0], messages=messages, max_tokens=N_NEW,
                                           extra_body=GREEDY)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text(expect_ids)
    assert choice.finish_reason == ("stop" if expect_ids[-1] in ref.eos else "length")
    assert reply.usage.prompt_tokens == len(ref.prompt_ids(messages))
    assert reply.usage.completion_tokens == len(expect_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    reasoning_tokens = reply.usage.completion_tokens_details.reasoning_tokens
    assert 0 <= reasoning_tokens <= reply.usage.completion_tokens
    if ref.tokenizer.convert_tokens_to_ids("<think>") not in expect_ids:
        assert reasoning_tokens == 0
    assert reply.model == SERVED_NAMES[0]
    # the alias serves the same model
    alias = client.chat.completions.create(model=SERVED_NAMES[1], messages=messages, max_tokens=N_NEW,
                                           extra_body=GREEDY)
    assert alias.choices[0].message.content == choice.message.content and alias.model == SERVED_NAMES[1]


def test_streaming_equals_non_streaming_with_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Open Chrome and search for the weather"}]
    whole = client.chat.completions.create(model=SERVED_NAMES[0], messages=messages, max_tokens=N_NEW,
                                           extra_body=GREEDY)
    chunks = list(client.chat.completions.create(
        model=SERVED_NAMES[0], messages=messages, max_tokens=N_NEW, stream=True,
        stream_options={"include_usage": True}, extra_body=GREEDY,
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_image_part_equals_transformers_greedy(client: openai.OpenAI, ref: Reference, server: ServerProcess) -> None:
    png = _png(84, 56, seed=1)
    text = "Open Chrome"
    reply = client.chat.completions.create(
        model=SERVED_NAMES[0], max_tokens=N_NEW, extra_body=GREEDY,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(png)}},
                                               {"type": "text", "text": text}]}],
    )
    # AutoGLM is served in "string" content mode: placeholder + "\n" + text (API_NOTES §1)
    placeholder = "<|begin_of_image|><|image|><|end_of_image|>"
    ids = ref.prompt_ids([{"role": "user", "content": placeholder + "\n" + text}])
    image = Image.open(io.BytesIO(png)).convert("RGB")
    expect_ids, _ = ref.greedy(ids, N_NEW, image=image)
    n_slots = int(ref.images(images=[image], return_tensors="pt")["image_grid_thw"].prod()) // 4
    assert reply.usage.prompt_tokens == len(ids) - 1 + n_slots
    assert reply.choices[0].message.content == ref.text(expect_ids)
    # the same image read from the allowed local media directory gives the same reply
    assert server.media_dir is not None
    (server.media_dir / "same.png").write_bytes(png)
    local = client.chat.completions.create(
        model=SERVED_NAMES[0], max_tokens=N_NEW, extra_body=GREEDY,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"file://{server.media_dir / 'same.png'}"}},
            {"type": "text", "text": text}]}],
    )
    assert local.choices[0].message.content == reply.choices[0].message.content


def test_logprobs_equal_transformers(client: openai.OpenAI, ref: Reference) -> None:
    messages = [{"role": "user", "content": "hello"}]
    expect_ids, rows = ref.greedy(ref.prompt_ids(messages), 4)
    reply = client.chat.completions.create(model=SERVED_NAMES[0], messages=messages, max_tokens=4, logprobs=True,
                                           top_logprobs=3, extra_body={**GREEDY, "ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) >= 1
    for entry, token_id, row in zip(content, expect_ids, rows, strict=False):
        assert entry.logprob == pytest.approx(float(row[token_id]), abs=1e-3)
        assert len(entry.top_logprobs) == 3
        top = torch.topk(row, 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy picks the top


def test_logit_bias_forces_and_rejects(client: openai.OpenAI, ref: Reference) -> None:
    # +100 on one ordinary token makes every greedy step pick it (the tiny model's logits are a few units wide)
    forced = ref.tokenizer("hello", add_special_tokens=False)["input_ids"][0]
    hi = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(
        model=SERVED_NAMES[0], messages=hi, max_tokens=3, logit_bias={str(forced): 100},
        extra_body={**GREEDY, "ignore_eos": True},
    )
    assert reply.choices[0].message.content == ref.text([forced] * 3)
    # -100 on the greedy choice: transformers' second choice instead
    prompt = "The weather today is"
    _, rows = ref.greedy(ref.tokenizer(prompt)["input_ids"], 1)
    first, second = torch.topk(rows[0], 2).indices.tolist()
    banned = client.completions.create(
        model=SERVED_NAMES[0], prompt=prompt, max_tokens=1, logit_bias={str(first): -100},
        extra_body={**GREEDY, "ignore_eos": True, "skip_special_tokens": False},
    )
    assert banned.choices[0].text == ref.tokenizer.decode([second])
    bad = (({"5": 101}, "logit_bias"), ({"999999999": 1}, "outside the vocabulary"), ({"x": 1}, "token ids"))
    for bias, match in bad:
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(model=SERVED_NAMES[0], messages=hi, max_tokens=2, logit_bias=bias)


def test_text_completion_equals_transformers(client: openai.OpenAI, ref: Reference) -> None:
    prompt = "The weather today is"
    ids = ref.tokenizer(prompt)["input_ids"]
    expect_ids, _ = ref.greedy(ids, N_NEW)
    reply = client.completions.create(model=SERVED_NAMES[0], prompt=prompt, max_tokens=N_NEW, extra_body=GREEDY)
    assert reply.choices[0].text == ref.text(expect_ids)
    assert reply.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=SERVED_NAMES[0], prompt=prompt, max_tokens=N_NEW, stream=True, extra_body=GREEDY) if c.choices)
    assert streamed == reply.choices[0].text


def test_errors_are_sdk_exceptions(client: openai.OpenAI) -> None:
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist."):
        client.chat.completions.create(model="gpt-4o", messages=hi, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
        client.chat.completions.create(model=SERVED_NAMES[0], messages=hi, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length is"):
        client.chat.completions.create(model=SERVED_NAMES[0], messages=hi, max_tokens=MAX_MODEL_LEN + 1)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED_NAMES[0], messages=[], max_tokens=2)
    assert info.value.status_code == 400 and info.value.body["type"] == "invalid_request_error"
