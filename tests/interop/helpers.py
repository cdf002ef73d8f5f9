"""Shared pieces of the interop tests: prompts, our logits (through `LLM.score`) and transformers' logits."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from autoglm.engine.prompt import assemble_prompt
from autoglm.llm import LLM

TEXTS = ("Open Chrome and tap the search bar.", "打开微信，搜索联系人", "def add(a, b):\n    return a + b", "Hi 😀 🎉")


def image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def chat_ids(llm: LLM, text: str, *, with_image: bool) -> list[int]:
    """[gMASK]<sop><|user|> text [<|begin_of_image|><|image|><|end_of_image|>] <|assistant|> as token ids."""
    tok = llm.model.tokenizer
    sp = tok.token_to_id
    ids = [sp("[gMASK]"), sp("<sop>"), sp("<|user|>"), *tok.encode(text, add_special_tokens=False)]
    if with_image:
        ids += [sp("<|begin_of_image|>"), sp("<|image|>"), sp("<|end_of_image|>")]
    return [*ids, sp("<|assistant|>")]


def ours_and_reference(
    llm: LLM, ref: Any, ids: list[int], images: list[Image.Image]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt logits [T, V] from autoglm (LLM.score) and from transformers on the same expanded prompt + pixels."""
    ours = llm.score(ids, images=images)
    enc = llm.model.encoders.get("image")
    prompt = assemble_prompt(ids, [(enc, im) for im in images])
    expanded, items = prompt.token_ids, [m.inputs for m in prompt.media]
    x = torch.tensor([expanded])
    kw: dict[str, Any] = {"input_ids": x, "mm_token_type_ids": (x == ref.config.image_token_id).int()}
    if items:
        kw["pixel_values"] = torch.cat([it.data["pixel_values"] for it in items])
        kw["image_grid_thw"] = torch.tensor([list(it.grid) for it in items])
    with torch.no_grad():
        expect = ref(**kw).logits[0].float()
    return ours, expect


def rel_err(ours: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """max |ours - ref| / max |ref| (the error relative to the logit scale)."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())
