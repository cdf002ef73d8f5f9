"""Write a random GLM-4 checkpoint of about 1.5 B parameters (HF safetensors, bfloat16) and its GGUF conversions.

The model is larger than the L3 cache, so decode is memory-bound: it is the yardstick for "within 80 % of the
memory-bandwidth bound" (BENCHMARKS.md). Weights are N(0, 0.02) (norms 1), seeded, so every run makes the same files.

    python benchmarks/make_synthetic_glm4.py OUT_DIR [--preset 1.5b|tiny] [--gguf q4_k_m,q8_0]

Writes OUT_DIR/hf (config.json, model*.safetensors, tokenizer files) and OUT_DIR/glm4-synthetic-<type>.gguf via our
converter (autoglm.gguf.writer.convert_text). The tokenizer is the tiny GLM-4.1V-style test tokenizer
(benchmarks feed random token ids; the embedding rows past it are padding, as in the real 151552-row vocabulary).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

PRESETS: dict[str, dict[str, int]] = {
    # 620 M embeddings + lm_head (GLM vocabulary) + 20 x 44 M layers = 1.50 B parameters;
    # intermediate 5632 = 22 x 256 so every K-quant row is whole super-blocks (no fallback types)
    "1.5b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151552),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
}  # fmt: skip


def config_for(preset: str) -> dict[str, object]:
    p = PRESETS[preset]
    head_dim = p["hidden_size"] // p["num_attention_heads"]
    return {
        "architectures": ["Glm4ForCausalLM"],
        "model_type": "glm4",
        "torch_dtype": "bfloat16",
        **p,
        "head_dim": head_dim,
        "attention_bias": True,
        "partial_rotary_factor": 0.5,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "eos_token_id": [151329, 151336, 151338] if p["vocab_size"] > 151338 else [0],
        "pad_token_id": 151329 if p["vocab_size"] > 151329 else 0,
    }


def tensors(config: dict[str, object], seed: int):  # noqa: ANN201 (generator of (name, tensor))
    """(HF name, bfloat16 tensor) in checkpoint order; generated one at a time (memory: one tensor)."""
    g = torch.Generator().manual_seed(seed)
    d, inter, v = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["vocab_size"])
    h, kv, hd = int(config["num_attention_heads"]), int(config["num_key_value_heads"]), int(config["head_dim"])

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    yield "model.embed_tokens.weight", rnd(v, d)
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", rnd(h * hd, d)
        yield p + "self_attn.q_proj.bias", rnd(h * hd)
        yield p + "self_attn.k_proj.weight", rnd(kv * hd, d)
        yield p + "self_attn.k_proj.bias", rnd(kv * hd)
        yield p + "self_attn.v_proj.weight", rnd(kv * hd, d)
        yield p + "self_attn.v_proj.bias", rnd(kv * hd)
        yield p + "self_attn.o_proj.weight", rnd(d, h * hd)
        yield p + "mlp.gate_up_proj.weight", rnd(2 * inter, d)
        yield p + "mlp.down_proj.weight", rnd(d, inter)
        for norm in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"):
            yield p + norm + ".weight", torch.ones(d, dtype=torch.bfloat16)
    yield "model.norm.weight", torch.ones(d, dtype=torch.bfloat16)
    yield "lm_head.weight", rnd(v, d)


def write_hf(out: Path, preset: str, seed: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from autoglm.tools.quantize import ShardedWriter
    from tests.fixtures.tokenizer import write_glm_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    config = config_for(preset)
    write_glm_tokenizer(out)
    writer = ShardedWriter(out, shard_bytes=2 << 30)
    n = 0
    for name, t in tensors(config, seed):
        writer.add(name, t)
        n += t.numel()
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config["eos_token_id"], "do_sample": False}), encoding="utf-8"
    )
    print(f"wrote {out}: {n:,} parameters")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1.5b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf", default="q4_k_m,q8_0", help="comma-separated GGUF types to convert to ('' for none)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hf = write_hf(args.out / "hf", args.preset, args.seed)
    from autoglm.gguf.writer import convert_text

    for outtype in [t for t in args.gguf.split(",") if t]:
        t0 = time.perf_counter()
        path = convert_text(hf, args.out / f"glm4-synthetic-{outtype}.gguf", outtype=outtype, progress=True)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
