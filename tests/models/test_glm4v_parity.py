"""GLM-4.1V (vision tower, M-RoPE positions, full multimodal model) against transformers on tiny random checkpoints.

Every comparison loads our model through `load_hf` from a checkpoint transformers saved (H1's fixtures in
tests/fixtures/models.py), and builds the transformers inputs the way its processor would (same pixel patches, same
expanded prompt, `mm_token_type_ids`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from autoglm.engine.prompt import assemble_prompt, expand_placeholders
from autoglm.layers.attention import Attention, AttentionBackend, AttentionContext, make_backend
from autoglm.loader.hf import load_hf
from autoglm.models.base import DecoderModel
from autoglm.models.glm4v import Glm4vForConditionalGeneration, VisionEncoder
from autoglm.models.loaded import LoadedModel
from autoglm.models.positions import MediaSpan, PromptPositions, mrope_positions
from autoglm.multimodal.encoder import Encoder, EncoderInputs
from tests.fixtures.models import GLM4V_CONFIGS

# Non-square images of different sizes (width, height); small so the tiny models stay fast.
IMAGE_SIZES = [(90, 50), (40, 130), (150, 100)]


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def pairs(tiny_glm4v_dirs: list[Path]) -> list[tuple[LoadedModel, Any, Path]]:
    """(ours via load_hf, transformers' model, dir) for each tiny GLM-4.1V config."""
    from transformers import Glm4vForConditionalGeneration as Ref

    out = []
    for d in tiny_glm4v_dirs:
        ours = load_hf(d, dtype="float32")
        ref = Ref.from_pretrained(d, dtype=torch.float32).eval()
        out.append((ours, ref, d))
    return out


def _specials(d: Path) -> dict[str, int]:
    data = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {v["content"]: int(k) for k, v in data["added_tokens_decoder"].items()}


def _prompt(d: Path, n_images: int, seed: int) -> list[int]:
    """A chat-shaped prompt with `n_images` image placeholders (one <|image|> token each) and random text ids."""
    sp = _specials(d)
    rng = np.random.default_rng(seed)

    def text(n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, 250, n)]

    ids = [sp["[gMASK]"], sp["<sop>"], sp["<|user|>"], *text(3)]
    for _ in range(n_images):
        ids += [sp["<|begin_of_image|>"], sp["<|image|>"], sp["<|end_of_image|>"], *text(4)]
    return ids + [sp["<|assistant|>"], *text(2)]


def _span3(pp: PromptPositions, lo: int, hi: int) -> torch.Tensor:
    """Positions [3, hi - lo] (a text-only prompt's 1-D positions on all three rows)."""
    p = pp.span(lo, hi)
    return p if p.dim() == 2 else p.expand(3, -1)


def _inputs(loaded: LoadedModel, ids: list[int], images: list[Image.Image]):
    """-> (expanded ids, positions [3, L], PromptPositions, our inputs_embeds [L, D] | None, EncoderInputs list),
    assembled as the engine does (`assemble_prompt`, the decoder's `prompt_positions`)."""
    model: Glm4vForConditionalGeneration = loaded.decoder  # type: ignore[assignment]
    enc = loaded.encoders.get("image")
    prompt = assemble_prompt(ids, [(enc, im) for im in images])
    expanded = prompt.token_ids
    items: list[EncoderInputs] = [m.inputs for m in prompt.media]
    pp = model.prompt_positions(len(expanded), prompt.spans)
    embeds = None
    if items:
        assert isinstance(enc, VisionEncoder)
        embeds = model.embed_tokens(torch.tensor(expanded))  # [L, D]; image slots overwritten like the runner does
        for m, rows in zip(prompt.media, enc.encode_batch(items), strict=True):
            embeds[m.offset : m.offset + m.n_slots] = rows
    return expanded, _span3(pp, 0, len(expanded)), pp, embeds, items


def _prompt_positions(model: Glm4vForConditionalGeneration, n: int, spans: Any) -> PromptPositions:
    """The decoder's own answer (the contract the engine uses), from spans in slot units (grid after the merge)."""
    m = model.spatial_merge_size
    slots = [MediaSpan(s.offset, s.length, (s.grid[0], s.grid[1] // m, s.grid[2] // m)) for s in spans]
    return model.prompt_positions(n, slots)


def _ref_kwargs(ref: Any, expanded: list[int], items: list[EncoderInputs]) -> dict[str, Any]:
    x = torch.tensor([expanded])
    kw: dict[str, Any] = {"input_ids": x, "mm_token_type_ids": (x == ref.config.image_token_id).int()}
    if items:
        kw["pixel_values"] = torch.cat([it.data["pixel_values"] for it in items])
        kw["image_grid_thw"] = torch.tensor([list(it.grid) for it in items])
    return kw


def _close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel} x max|ref| {scale:.3g}"


# --- vision tower ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("idx", range(len(GLM4V_CONFIGS)))
def test_vision_tower_matches_transformers_batched(pairs, idx: int) -> None:
    loaded, ref, _ = pairs[idx]
    model: Glm4vForConditionalGeneration = loaded.decoder  # type: ignore[assignment]
    assert model.visual is not None
    g = torch.Generator().manual_seed(idx)
    for grids in ([(1, 4, 6)], [(1, 6, 2), (1, 8, 10)], [(1, 2, 2), (1, 12, 4), (1, 4, 4)]):
        n = sum(t * h * w for t, h, w in grids)
        pv = torch.randn(n, 3 * 2 * 14 * 14, generator=g)
        with torch.no_grad():
            expect = ref.model.visual(pv, grid_thw=torch.tensor(grids)).pooler_output
            got = model.visual(pv, grids)
        _close(got, expect, 1e-5)
        # images in one call == each alone (attention never crosses images)
        start, off = 0, 0
        with torch.no_grad():
            for t, h, w in grids:
                alone = model.visual(pv[start : start + t * h * w], [(t, h, w)])
                _close(alone, got[off : off + t * h * w // 4], 1e-5)
                start += t * h * w
                off += t * h * w // 4


def test_vision_encoder_contract(pairs) -> None:
    loaded, ref, _ = pairs[0]
    enc = loaded.encoders["image"]
    assert isinstance(enc, Encoder) and isinstance(enc, VisionEncoder)
    assert enc.modality == "image" and enc.placeholder == "<|image|>"
    assert enc.placeholder_id == ref.config.image_token_id
    assert enc.device == torch.device("cpu")
    # preprocessing constants come from the checkpoint's preprocessor_config.json (published GLM-4.1V values)
    assert (enc.image_processor.min_pixels, enc.image_processor.max_pixels) == (12544, 9633792)
    a, b = _image(90, 50, 1), _image(40, 130, 2)
    ia, ib = enc.preprocess(a), enc.preprocess(b)
    t, h, w = ia.grid
    assert ia.n_slots == t * h * w // 4 and ia.data["pixel_values"].shape == (t * h * w, 3 * 2 * 14 * 14)
    assert ia.content_hash == enc.preprocess(a.copy()).content_hash != ib.content_hash
    out = enc.encode(ia)
    assert out.shape == (ia.n_slots, loaded.decoder.hidden_size)
    assert out.dtype == loaded.decoder.embed_tokens(torch.tensor([0])).dtype
    with torch.no_grad():
        expect = ref.model.get_image_features(ia.data["pixel_values"], torch.tensor([list(ia.grid)])).pooler_output[0]
    _close(out, expect, 1e-5)
    both = enc.encode_batch([ia, ib])
    _close(both[0], out, 1e-5)
    _close(both[1], enc.encode(ib), 1e-5)


# --- M-RoPE positions --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_images", [0, 1, 2, 3])
def test_rope_index_matches_transformers(pairs, n_images: int) -> None:
    loaded, ref, d = pairs[1]
    ids = _prompt(d, n_images, seed=n_images)
    items = [loaded.encoders["image"].preprocess(_image(w, h, i)) for i, (w, h) in enumerate(IMAGE_SIZES[:n_images])]
    img_id = ref.config.image_token_id
    expanded, spans = expand_placeholders(
        ids, [img_id] * len(items), [it.n_slots for it in items], [it.slot_grid for it in items]
    )
    # begin/end-of-image tokens stay; each placeholder became n_slots image tokens
    assert len(expanded) == len(ids) - n_images + sum(it.n_slots for it in items)
    assert [s.length for s in spans] == [it.n_slots for it in items]
    assert all(expanded[s.offset - 1] == _specials(d)["<|begin_of_image|>"] for s in spans)
    pp = loaded.decoder.prompt_positions(len(expanded), spans)
    pos, delta = _span3(pp, 0, len(expanded)), pp.delta
    x = torch.tensor([expanded])
    grids = torch.tensor([list(it.grid) for it in items]) if items else None
    ref_pos, ref_delta = ref.model.get_rope_index(x, (x == img_id).int(), image_grid_thw=grids)
    assert torch.equal(pos, ref_pos[:, 0])
    assert delta == int(ref_delta)
    # generated tokens continue at index + delta on all rows (transformers' cached-decode rule)
    n = len(expanded)
    assert torch.equal(_span3(pp, n, n + 2)[:, 1], torch.full((3,), n + 1 + delta))


def test_adjacent_images_and_errors() -> None:
    from autoglm.errors import InvalidRequest

    # two images back to back with no separator are still told apart by their spans
    ids = [5, 9, 6, 9, 6]  # 9 = placeholder; slot grids (1, 1, 2) and (1, 2, 3)
    expanded, spans = expand_placeholders(ids, [9, 9], [2, 6], [(1, 1, 2), (1, 2, 3)])
    expanded = [t for t in expanded if t != 6] + [6]  # back to back: 5, 9 x 8, 6
    spans = [spans[0], MediaSpan(3, 6, (1, 2, 3))]
    pp = mrope_positions(len(expanded), spans)
    pos, delta = _span3(pp, 0, len(expanded)), pp.delta
    assert pos[:, 1:3].tolist() == [[1, 1], [1, 1], [1, 2]]
    assert pos[:, 3].tolist() == [3, 3, 3]  # second image starts after max(1, 2) of the first
    assert delta == int(pos.max()) + 1 - len(expanded)
    with pytest.raises(InvalidRequest, match="2 media placeholder"):
        expand_placeholders([1, 9, 9], [9], [4])
    with pytest.raises(ValueError, match="does not match its slot grid"):
        mrope_positions(4, [MediaSpan(1, 2, (1, 2, 2))])


# --- full model ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("idx", range(len(GLM4V_CONFIGS)))
@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_logits_match_transformers(pairs, idx: int, n_images: int) -> None:
    loaded, ref, d = pairs[idx]
    model = loaded.decoder
    assert isinstance(model, DecoderModel) and model.uses_mrope
    ids = _prompt(d, n_images, seed=100 + idx)
    images = [_image(w, h, 10 * idx + i) for i, (w, h) in enumerate(IMAGE_SIZES[:n_images])]
    expanded, positions, _, embeds, items = _inputs(loaded, ids, images)
    with torch.no_grad():
        expect = ref(**_ref_kwargs(ref, expanded, items)).logits[0]
        hidden = model(torch.tensor(expanded), positions, AttentionContext.no_cache([len(expanded)]), embeds)
        got = model.compute_logits(hidden)
    assert got.dtype == torch.float32
    _close(got, expect)


def test_bfloat16_error_comparable_to_transformers(pairs) -> None:
    """bf16 load with two images: our error against fp32 is within 1.5x transformers' own bf16 error."""
    from transformers import Glm4vForConditionalGeneration as Ref

    loaded32, ref32, d = pairs[0]
    loaded = load_hf(d, dtype="bfloat16")
    ref16 = Ref.from_pretrained(d, dtype=torch.bfloat16).eval()
    images = [_image(150, 100, 3), _image(40, 130, 4)]
    expanded, positions, _, embeds, items = _inputs(loaded, _prompt(d, 2, seed=7), images)
    assert embeds is not None and embeds.dtype == torch.bfloat16
    model = loaded.decoder
    with torch.no_grad():
        ours = model.compute_logits(
            model(torch.tensor(expanded), positions, AttentionContext.no_cache([len(expanded)]), embeds)
        )
        kw = _ref_kwargs(ref32, expanded, items)
        exact = ref32(**kw).logits[0]
        theirs = ref16(**kw).logits[0].float()
    scale = exact.abs().max().item()
    err_ours = (ours - exact).abs().max().item() / scale
    err_theirs = (theirs - exact).abs().max().item() / scale
    assert err_ours <= 1.5 * err_theirs + 1e-3, (err_ours, err_theirs)


def _attach_cache(model: torch.nn.Module, num_blocks: int, block_size: int) -> AttentionBackend:
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    return make_backend(layers, num_blocks=num_blocks, block_size=block_size, dtype=torch.float32)


@pytest.mark.parametrize("idx", [0, 2])
def test_greedy_32_tokens_with_image(pairs, idx: int) -> None:
    loaded, ref, d = pairs[idx]
    model = loaded.decoder
    ids = _prompt(d, 1, seed=7)
    expanded, positions, pp, embeds, items = _inputs(loaded, ids, [_image(150, 100, 3)])
    n_new = 32
    with torch.no_grad():
        # plain greedy: no EOS stop, and none of the fixture's generation_config processors (repetition penalty)
        out = ref.generate(
            **_ref_kwargs(ref, expanded, items),
            max_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            repetition_penalty=1.0,
        )
    expect = out[0, len(expanded) :].tolist()
    assert len(expect) == n_new

    block_size = 16
    total = len(expanded) + n_new
    nb = (total + block_size - 1) // block_size
    backend = _attach_cache(model, nb, block_size)
    try:
        table = torch.arange(nb)[None]
        got: list[int] = []
        with torch.no_grad():
            # prefill in two chunks (the engine's chunked prefill), slicing the prompt's M-RoPE positions
            cut = len(expanded) // 2
            for lo, hi in ((0, cut), (cut, len(expanded))):
                ctx = AttentionContext([hi - lo], [hi], torch.arange(lo, hi), table, backend=backend)
                h = model(torch.tensor(expanded[lo:hi]), pp.span(lo, hi), ctx, embeds[lo:hi])
            tok = int(model.compute_logits(h[-1:]).argmax(-1))
            got.append(tok)
            for i in range(len(expanded), total - 1):
                ctx = AttentionContext([1], [i + 1], torch.tensor([i]), table, backend=backend)
                h = model(torch.tensor([tok]), pp.span(i, i + 1), ctx)
                tok = int(model.compute_logits(h).argmax(-1))
                got.append(tok)
    finally:
        backend.release()
    assert got == expect


def test_packed_batch_equals_alone(pairs) -> None:
    """An image prompt and a text prompt packed in one forward give the same logits as each alone."""
    loaded, _, d = pairs[0]
    model = loaded.decoder
    a = _inputs(loaded, _prompt(d, 1, seed=1), [_image(90, 50, 5)])
    b = _inputs(loaded, _prompt(d, 0, seed=2), [])
    emb_b = model.embed_tokens(torch.tensor(b[0]))
    with torch.no_grad():
        alone = [
            model.compute_logits(model(torch.tensor(x[0]), x[1], AttentionContext.no_cache([len(x[0])]), e))
            for x, e in ((a, a[3]), (b, emb_b))
        ]
        packed = model.compute_logits(
            model(
                torch.tensor(a[0] + b[0]),
                torch.cat([a[1], b[1]], dim=1),
                AttentionContext.no_cache([len(a[0]), len(b[0])]),
                torch.cat([a[3], emb_b]),
            )
        )
    _close(packed, torch.cat(alone), 1e-5)


# --- loading -------------------------------------------------------------------------------------------------------
def test_no_vision_load_runs_text_only(pairs) -> None:
    loaded, ref, d = pairs[0]
    text_only = load_hf(d, dtype="float32", no_vision=True)
    model: Glm4vForConditionalGeneration = text_only.decoder  # type: ignore[assignment]
    assert model.visual is None and model.vision_encoder() is None
    assert "image" not in text_only.encoders
    assert not any(n.startswith("visual.") for n, _ in model.named_parameters())
    ids = _prompt(d, 0, seed=3)
    positions = model.prompt_positions(len(ids), []).span(0, len(ids))
    with torch.no_grad():
        got = model.compute_logits(model(torch.tensor(ids), positions, AttentionContext.no_cache([len(ids)])))
        expect = ref(**_ref_kwargs(ref, ids, [])).logits[0]
    _close(got, expect)


def test_older_checkpoint_names_load(pairs, tmp_path: Path) -> None:
    """transformers < 4.54 names (model.layers.*, visual.*) load into the same model."""
    loaded, ref, d = pairs[1]
    old = tmp_path / "old"
    old.mkdir()
    for f in d.iterdir():
        if f.suffix != ".safetensors":
            (old / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(d / "model.safetensors"))
    renamed = {
        k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v for k, v in tensors.items()
    }
    assert any(k.startswith("visual.") for k in renamed) and any(k.startswith("model.layers.") for k in renamed)
    save_file(renamed, str(old / "model.safetensors"), metadata={"format": "pt"})
    again = load_hf(old, dtype="float32")
    ours = dict(loaded.decoder.named_parameters())
    for n, p in again.decoder.named_parameters():
        assert torch.equal(p, ours[n]), n
