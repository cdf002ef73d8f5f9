"""GLM-4.1V-architecture checkpoints for the phone-agent benchmark: HF safetensors + llama.cpp's own GGUF conversion.

    python benchmarks/phone_agent_model.py OUT_DIR [--preset synthetic|tiny]

Writes OUT_DIR/hf (config.json, model.safetensors, tokenizer, preprocessor_config.json) and, through llama.cpp's
converter (scripts/llamacpp_convert.py, `$AUTOGLM_LLAMACPP_DIR` or the sdist copy), OUT_DIR/model-f32.gguf and
OUT_DIR/mmproj-f32.gguf. Weights are random (seeded).

Shapes. GLM-4.1V-9B (AutoGLM-Phone-9B's architecture, transformers' `Glm4vConfig` defaults): text hidden 4096,
intermediate 13696, 40 layers, 32 heads / 2 KV heads (head_dim 128), partial rotary 0.5, vocab 151552; vision
1536 wide, 24 layers, 12 heads, intermediate 13696, out 4096, patch 14, merge 2. The `synthetic` preset keeps every
width and head count and scales only depth (text 2 of 40 layers, vision 2 of 24) and the vocabulary (a 4096-token
BPE trained on phone-agent text instead of 151552 rows: only the lm_head row count changes, which the first token
does not depend on beyond one [4096 x V] product) so it fits 24 GB RAM and 2 cores. Per-layer costs are the real
ones; a full-depth estimate is depth x the per-layer share (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL_TEXT = dict(hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32,
                 num_key_value_heads=2, vocab_size=151552)  # fmt: skip
REAL_VISION = dict(depth=24, hidden_size=1536, num_heads=12, intermediate_size=13696)

PRESETS: dict[str, dict[str, Any]] = {
    "synthetic": dict(text={**REAL_TEXT, "num_hidden_layers": 2}, vision={**REAL_VISION, "depth": 2}, vocab=4096),
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2), vision=dict(depth=2, hidden_size=32, num_heads=2,
                                                                 intermediate_size=64), vocab=512),
}  # fmt: skip


def write_tokenizer(path: Path, vocab: int, corpus: list[str]) -> dict[str, int]:
    """A byte-level BPE with GLM-4's split regex and GLM-4.1V's special tokens, trained on `corpus`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from tests.fixtures.tokenizer import GLM_SPECIAL_TOKENS, GLM_SPLIT_REGEX, write_glm_tokenizer

    write_glm_tokenizer(path)  # tokenizer_config.json + the published chat template; tokenizer.json replaced below
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab - len(GLM_SPECIAL_TOKENS) - 16, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM_SPECIAL_TOKENS])
    tok.save(str(path / "tokenizer.json"))
    specials = {t: int(tok.token_to_id(t)) for t in GLM_SPECIAL_TOKENS}
    cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    old = cfg["added_tokens_decoder"]
    entry = {v["content"]: v for v in old.values()}
    cfg["added_tokens_decoder"] = {str(i): entry[t] for t, i in specials.items()}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    return specials


def write_hf(path: Path, preset: str, corpus: list[str], seed: int = 0) -> Path:
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    from tests.fixtures.models import PREPROCESSOR_CONFIG

    spec = PRESETS[preset]
    path.mkdir(parents=True, exist_ok=True)
    sp = write_tokenizer(path, spec["vocab"], corpus)
    vocab = spec["vocab"]
    text = dict(spec["text"], vocab_size=vocab)
    media = {"image_start_token_id": sp["<|begin_of_image|>"], "image_end_token_id": sp["<|end_of_image|>"],
             "video_start_token_id": sp["<|begin_of_video|>"], "video_end_token_id": sp["<|end_of_video|>"],
             "image_token_id": sp["<|image|>"], "video_token_id": sp["<|video|>"]}  # fmt: skip
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    rot_half = head_dim // 4  # rotary dim = head_dim * 0.5; mrope sections sum to rotary_dim / 2
    section = [rot_half - 2 * (rot_half * 3 // 8), rot_half * 3 // 8, rot_half * 3 // 8]  # 128 -> [8, 12, 12]
    config = Glm4vConfig(
        text_config=dict(max_position_embeddings=32768, rms_norm_eps=1e-5, pad_token_id=sp["<|endoftext|>"],
                         attention_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                          "mrope_section": section}, **text),
        vision_config=dict(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, image_size=336, in_channels=3,
                           out_hidden_size=text["hidden_size"], rms_norm_eps=1e-5, **spec["vision"]),
        **media,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Glm4vForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # N(0, 0.02), norms 1: activations stay finite through the layers
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(path)
    from transformers import GenerationConfig

    eos = [sp[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>", "</answer>")]
    GenerationConfig(eos_token_id=eos, pad_token_id=sp["<|endoftext|>"]).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2), encoding="utf-8")
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {path}: {n / 1e6:.0f} M parameters", flush=True)
    return path


def convert(hf: Path, out: Path, outtype: str = "f32") -> tuple[Path, Path]:
    """llama.cpp's converter: text GGUF and mmproj, both `outtype` (f32: the same weights our side loads from `hf`;
    q8_0: the files both sides load)."""
    model, mmproj = out / f"model-{outtype}.gguf", out / f"mmproj-{outtype}.gguf"
    env = {**os.environ}
    if Path("/work/llamacpp/src/convert_hf_to_gguf.py").is_file():
        env.setdefault("AUTOGLM_LLAMACPP_DIR", "/work/llamacpp/src")
    for dest, extra in ((model, []), (mmproj, ["--mmproj"])):
        if dest.is_file():
            continue
        cmd = [sys.executable, str(ROOT / "scripts" / "llamacpp_convert.py"), str(hf), "--outfile", str(dest),
               "--outtype", outtype, *extra]  # fmt: skip
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        print(f"converted {dest.name} in {time.perf_counter() - t:.1f}s", flush=True)
    return model, mmproj


def make(out: Path, preset: str, corpus: list[str], outtype: str = "f32") -> tuple[Path, Path, Path]:
    hf = out / "hf"
    if not (hf / "config.json").is_file():
        write_hf(hf, preset, corpus)
    model, mmproj = convert(hf, out, outtype)
    return hf, model, mmproj


def main() -> None:
    from benchmarks.phone_agent_request import corpus

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="synthetic")
    a = ap.parse_args()
    make(a.out, a.preset, corpus())


if __name__ == "__main__":
    main()
