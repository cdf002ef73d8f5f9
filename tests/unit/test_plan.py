"""Memory planner: hand-computed numbers on a tiny config, parameter counts vs transformers' own models, the 9B
verdicts, GGUF metadata planning and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autoglm.errors import InvalidRequest
from autoglm.tools.plan import AUTOGLM_PHONE_9B, RUNTIME_BASE_BYTES, parse_bytes, plan_config, plan_model

TINY = {
    "architectures": ["Glm4ForCausalLM"],
    "model_type": "glm4",
    "torch_dtype": "float32",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "max_position_embeddings": 512,
}


def _rows(plan: object) -> dict[str, tuple[int, int]]:
    return {m.name: (m.parameters, m.bytes) for m in plan.modules}  # type: ignore[attr-defined]


def test_tiny_config_matches_hand_computation() -> None:
    plan = plan_config(TINY, ctx=100, ram="1GB", quantization="none", chunk=8)
    # per layer: q 64x64, k/v 32x64, o 64x64, qkv bias 64+32+32; gate/up 2 x 128x64; down 64x128; 4 norms of 64
    attention = 2 * (4096 + 2048 + 2048 + 4096 + 128)
    mlp = 2 * (2 * 8192 + 8192)
    norms = 2 * 256 + 64
    assert _rows(plan) == {
        "embeddings": (256 * 64, 256 * 64 * 4),
        "attention": (attention, attention * 4),
        "mlp": (mlp, mlp * 4),
        "norms": (norms, norms * 4),
        "lm_head": (256 * 64, 256 * 64 * 4),
    }
    assert plan.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv_heads x head_dim x float32
    assert plan.kv_bytes == plan.kv_bytes_per_token * 100
    per_token = (6 * 64 + 4 * 4 * 16 + 3 * 128) * 4
    assert plan.overhead_bytes == RUNTIME_BASE_BYTES + 8 * per_token + 8 * 256 * 4
    assert plan.total_bytes == plan.weight_bytes + plan.kv_bytes + plan.overhead_bytes
    assert plan.fits

    int8 = _rows(plan_config(TINY, ctx=100, ram="1GB", quantization="int8", chunk=8))
    # int8 linear weights: 1 byte each + a float32 scale per output row; biases/norms/embeddings stay float32
    assert int8["mlp"][1] == mlp + 2 * (2 * 128 + 64) * 4
    assert int8["attention"][1] == (attention - 256) + 2 * (64 + 32 + 32 + 64) * 4 + 256 * 4
    assert int8["lm_head"][1] == 256 * 64 + 256 * 4
    assert int8["embeddings"][1] == 256 * 64 * 4
    int4 = _rows(plan_config(TINY, ctx=100, ram="1GB", quantization="int4", chunk=8))
    # int4 (group 32): half a byte each + (scale, zero) bfloat16 per group; lm_head int8
    assert int4["mlp"][1] == mlp // 2 + 2 * (2 * 128 * 2 + 64 * 4) * 4
    assert int4["lm_head"][1] == 256 * 64 + 256 * 4
    bf16_kv = plan_config(TINY, ctx=100, ram="1GB", kv_dtype="bfloat16")
    assert bf16_kv.kv_bytes_per_token == plan.kv_bytes_per_token // 2


def _meta_param_count(model_cls: type, config: object) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_cls(config).parameters())


def test_parameter_counts_match_transformers(tiny_glm4_dirs: list[Path], tiny_glm4v_dirs: list[Path]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, Glm4vForConditionalGeneration

    for d in tiny_glm4_dirs:
        config = json.loads((d / "config.json").read_text())
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d))
        # a tied lm_head is the embedding matrix: counted once, like parameters() does
        assert sum(m.parameters for m in plan_config(config).modules) == sum(p.numel() for p in hf.parameters()), d
    for d in tiny_glm4v_dirs:
        config = json.loads((d / "config.json").read_text())
        with torch.device("meta"):
            hf = Glm4vForConditionalGeneration(AutoConfig.from_pretrained(d))
        plan = plan_config(config)
        vision = next(m.parameters for m in plan.modules if m.name == "vision")
        assert vision == sum(p.numel() for n, p in hf.named_parameters() if "visual" in n), d
        assert sum(m.parameters for m in plan.modules) == sum(p.numel() for p in hf.parameters()), d
        assert all(m.name != "vision" for m in plan_config(config, no_vision=True).modules)


def test_builtin_9b_config_matches_transformers_count() -> None:
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    text = {k: v for k, v in AUTOGLM_PHONE_9B["text_config"].items() if k not in ("rope_scaling", "torch_dtype")}
    cfg = Glm4vConfig(text_config=text, vision_config=AUTOGLM_PHONE_9B["vision_config"], tie_word_embeddings=False)
    expected = _meta_param_count(Glm4vForConditionalGeneration, cfg)
    plan = plan_model("autoglm-phone-9b")
    assert sum(m.parameters for m in plan.modules) == expected


def test_9b_q4_k_m_fits_12gb_and_8gb_only_text() -> None:
    # one phone screenshot (the article's workload). The tower runs in float32 on the GGUF path (its working set for
    # one screenshot is 1.06 GiB), so 8 GB holds the 9B only without it; the largest image costs more still
    shot = {"image_size": (1080, 2400)}
    q4 = plan_model("autoglm-phone-9b", ram="12GB", ctx=4096, quantization="q4_k_m", **shot)
    small = plan_model("autoglm-phone-9b", ram="8GB", ctx=4096, quantization="q4_k_m", **shot)
    largest = plan_model("autoglm-phone-9b", ram="12GB", ctx=4096, quantization="q4_k_m")
    bf16 = plan_model("autoglm-phone-9b", ram="12GB", ctx=4096, quantization="none", **shot)
    print(q4.render())
    assert q4.fits and not bf16.fits and not small.fits
    assert any(s.startswith("--no-vision") and s.endswith("fits") for s in small.suggestions)
    assert plan_model("autoglm-phone-9b", ram="8GB", ctx=4096, quantization="q4_k_m", no_vision=True).fits
    assert largest.image_bytes > q4.image_bytes and largest.total_bytes > q4.total_bytes
    vision = next(m for m in q4.modules if m.name == "vision")
    # a Q8_0 mmproj: linears kept in blocks, the convolutions / position table / norms float32 (gguf/mmproj.py)
    assert set(vision.formats) == {"Q8_0", "float32 (dequantized at load)"}
    assert vision.formats["Q8_0"] > 8 * vision.formats["float32 (dequantized at load)"]
    assert q4.kv_bytes_per_token == 40 * 2 * 2 * 128 * 2  # 40 KiB/token in bfloat16
    assert bf16.weight_bytes == sum(m.parameters for m in bf16.modules) * 2
    assert any("--quantization q4_k_m" in s for s in bf16.suggestions)
    # a context too long for 12 GB gets a concrete --ctx suggestion that itself fits
    long = plan_model("autoglm-phone-9b", ram="12GB", ctx=120000, quantization="q4_k_m", **shot)
    assert not long.fits
    ctx_hint = next(s for s in long.suggestions if s.startswith("a context of"))
    max_ctx = int(ctx_hint.split()[3])
    assert plan_model("autoglm-phone-9b", ram="12GB", ctx=max_ctx, quantization="q4_k_m", **shot).fits
    assert not plan_model("autoglm-phone-9b", ram="12GB", ctx=max_ctx + 1, quantization="q4_k_m", **shot).fits


def test_parse_bytes() -> None:
    assert parse_bytes("8GB") == parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("512MB") == 512 * 2**20
    assert parse_bytes("1.5g") == int(1.5 * 2**30)
    assert parse_bytes("1000") == 1000
    from autoglm.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="eight"):
        parse_bytes("eight")


def test_gguf_plan_uses_metadata_and_tensor_types(tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    path = tmp_path / "tiny.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(256)
    w.add_token_list([f"t{i}".encode() for i in range(32)])
    rng = np.random.default_rng(0)
    sizes = 0
    tensors = {
        "token_embd.weight": ((32, 64), GGMLQuantizationType.Q8_0),
        "blk.0.attn_q.weight": ((64, 64), GGMLQuantizationType.Q8_0),
        "blk.0.ffn_down.weight": ((64, 128), GGMLQuantizationType.F16),
        "blk.0.attn_norm.weight": ((64,), GGMLQuantizationType.F32),
    }
    for name, (shape, qtype) in tensors.items():
        data = rng.standard_normal(shape).astype(np.float32)
        if qtype == GGMLQuantizationType.Q8_0:
            raw = quantize(data, qtype)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            sizes += raw.nbytes
        else:
            arr = data.astype(np.float16) if qtype == GGMLQuantizationType.F16 else data
            w.add_tensor(name, arr)
            sizes += arr.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    plan = plan_model(str(path), ram="1GB", ctx=128)
    assert plan.weight_bytes == sizes
    # layers x (K,V) x kv_heads x head_dim x float32: the engine runs GGUF models, and so their cache, in float32
    assert plan.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    rows = {m.name: m for m in plan.modules}
    assert rows["embeddings"].formats == {"Q8_0": 32 * 64 // 32 * 34}
    assert rows["mlp"].formats == {"F16": 64 * 128 * 2}
    assert plan.quantization == "gguf (F16 mostly)"  # by bytes: the F16 ffn_down is the largest


def test_plan_cli_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from autoglm.cli import main

    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "autoglm-phone-9b",
                "--ram",
                "12GB",
                "--ctx",
                "4096",
                "--quantization",
                "q4_k_m",
                "--image",
                "1080x2400",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "FITS" in text and "KV cache" in text
    data = json.loads(out.read_text())
    assert data["fits"] is True and data["kv_bytes_per_token"] == 40960
    assert data["image_patches"] == 78 * 172 and data["image_size"] == [1080, 2400]
    assert {m["name"] for m in data["modules"]} >= {"embeddings", "attention", "mlp", "lm_head", "vision"}
    cfg = tmp_path / "m"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps(TINY))
    assert main(["plan", str(cfg), "--ram", "1MB", "--no-vision"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", str(tmp_path / "nothing")]) == 1


def test_image_working_set_is_priced_per_patch() -> None:
    """One image through the tower, by hand from the buffers image_memory names; the plan adds it to the total."""
    from autoglm.multimodal.image import ImageProcessorConfig
    from autoglm.tools.image_memory import image_memory, image_patches

    cfg = ImageProcessorConfig()
    vision = {"hidden_size": 1536, "out_hidden_size": 4096, "intermediate_size": 13696, "in_channels": 3}
    # 1080x2400 -> resized to 1092x2408 (multiples of 28, within max_pixels) -> 78 x 172 patches
    assert image_patches(cfg, (1080, 2400)) == 78 * 172
    n = 78 * 172
    tower = n * max(12 * 1536, 2 * 1536 + 3 * 4096) * 2
    merger = n // 4 * (4 * 1536 + 2 * 4096 + 3 * 13696) * 2
    want = 1080 * 2400 * 10 + max(n * 196 * 42, n * 1176 * 4 + max(tower, merger)) + n // 4 * 4096 * 2
    assert image_memory(vision, cfg, 2, (1080, 2400)).peak_bytes == want
    # the largest image: max_pixels counts both temporal frames, in whole 28x28 merge blocks
    assert image_patches(cfg, None) == cfg.max_pixels // (2 * 28 * 28) * 4
    big = image_memory(vision, cfg, 2, None)
    assert big.peak_bytes > image_memory(vision, cfg, 2, (1080, 2400)).peak_bytes
    # a smaller processor cap shrinks the largest image
    small = ImageProcessorConfig(max_pixels=2 * 28 * 28 * 500)
    assert image_patches(small, None) == 2000 and image_patches(small, (1080, 2400)) <= 2000

    vc = AUTOGLM_PHONE_9B["vision_config"]
    plan = plan_model("autoglm-phone-9b", ctx=4096, quantization="int4", image_size=(1080, 2400))  # bf16 tower
    assert plan.image_patches == n and plan.image_bytes == image_memory(vc, cfg, 2, (1080, 2400)).peak_bytes
    gguf = plan_model("autoglm-phone-9b", ctx=4096, quantization="q4_k_m", image_size=(1080, 2400))  # float32 tower
    assert gguf.image_bytes == image_memory(vc, cfg, 4, (1080, 2400)).peak_bytes
    assert plan.total_bytes == plan.weight_bytes + plan.kv_bytes + plan.overhead_bytes + plan.image_bytes
    assert "1080x2400 image: 13,416 patches" in plan.render()
    # an image the server refuses (over --max-image-pixels) is an error naming the limit, not a 90 GiB plan
    with pytest.raises(InvalidRequest, match="24,000,000 pixels"):
        plan_model("autoglm-phone-9b", image_size=(99999, 99999))
    text_only = plan_model("autoglm-phone-9b", ctx=4096, quantization="q4_k_m", no_vision=True)
    assert text_only.image_bytes == 0 and text_only.image_patches == 0


def test_image_plan_reads_the_checkpoint_processor(tmp_path: Path, tiny_glm4v_dir: Path) -> None:
    from autoglm.multimodal.image import ImageProcessorConfig
    from autoglm.tools.image_memory import image_patches

    d = tmp_path / "capped"
    d.mkdir()
    (d / "config.json").write_text((tiny_glm4v_dir / "config.json").read_text())
    pre = json.loads((tiny_glm4v_dir / "preprocessor_config.json").read_text())
    pre["size"]["longest_edge"] = 2 * 28 * 28 * 100  # at most 100 merged tokens per image
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    plan = plan_model(str(d))
    assert plan.image_patches == 400 == image_patches(ImageProcessorConfig.from_dir(d), None)
    assert plan_model(str(tiny_glm4v_dir)).image_patches > 400
