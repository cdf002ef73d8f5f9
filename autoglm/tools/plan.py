"""Memory planner: will a model fit in this much RAM at this context, and if not, what to change.

From `config.json` alone (no weights read), from a GGUF's metadata and tensor types, or from a built-in config
(`autoglm-phone-9b`). Builds the registry's model on `meta` and sums its real parameter shapes per module (any
architecture we load; checked against transformers' models in tests), prices them per weight format, adds the KV
cache at the context and a runtime overhead estimate.

Formats: none (the checkpoint dtype), int8 / int4 (our HF path: `autoglm.quant.apply` defaults — vision tower and
embeddings stay dense, lm_head int8 under int4), q8_0 / q4_k_m (GGUF: llama.cpp's per-tensor types incl. Q4_K_M's
Q6_K layers and the 256-column fallbacks; a Q8_0 mmproj, its linears kept in blocks and the rest float32, as the loader
holds it). A vision model also gets one image's working set (`autoglm.tools.image_memory`).
Sizes: "8GB" and "8GiB" both mean 8 * 2**30 bytes (RAM is sold in binary units); "MB"/"MiB" likewise.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autoglm.errors import ConfigError, InvalidRequest
from autoglm.multimodal.image import ImageProcessorConfig
from autoglm.multimodal.media import MediaPolicy
from autoglm.tools.image_memory import image_memory

QUANTIZATIONS = ("none", "int8", "int4", "q8_0", "q4_k_m")
KV_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_BASE_BYTES = 400 * 2**20  # Python + torch + tokenizer, measured RSS after import (~230 MB) plus slack
INT4_GROUP = 32
MMPROJ_HELD = "float32 (dequantized at load)"
PHONE_SCREENSHOT = (1080, 2400)  # an Open-AutoGLM screenshot: suggested when the largest image does not fit

# GLM-4.1V-9B-Thinking / AutoGLM-Phone-9B published config.json (the fields the planner reads)
AUTOGLM_PHONE_9B: dict[str, Any] = {
    "architectures": ["Glm4vForConditionalGeneration"],
    "model_type": "glm4v",
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "glm4v_text",
        "vocab_size": 151552,
        "hidden_size": 4096,
        "intermediate_size": 13696,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "attention_bias": True,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "default", "mrope_section": [8, 12, 12]},
        "torch_dtype": "bfloat16",
    },
    "vision_config": {
        "depth": 24,
        "hidden_size": 1536,
        "num_heads": 12,
        "intermediate_size": 13696,
        "out_hidden_size": 4096,
        "in_channels": 3,
        "image_size": 336,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "attention_bias": False,
    },
}
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "autoglm-phone-9b": AUTOGLM_PHONE_9B,
    "glm-4.1v-9b-thinking": AUTOGLM_PHONE_9B,
}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str | int) -> int:
    """ "8GB" / "8 GiB" / "512M" / "123456" -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise InvalidRequest(f"cannot read a size from {text!r}; use e.g. 8GB, 512MB, 6.5GiB", param="ram")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class Tensor2D:
    """One weight of the model as the planner sees it: GGUF-style name, shape (rows, cols) or (n,), module."""

    name: str
    shape: tuple[int, ...]
    module: str  # "embeddings" | "lm_head" | "attention" | "mlp" | "norms" | "vision"
    layer: int | None = None
    linear: bool = True  # a matmul weight (quantizable) vs embedding table / norm / bias / conv

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class ModuleRow:
    name: str
    parameters: int
    bytes: int
    formats: dict[str, int] = field(default_factory=dict)  # format -> bytes


@dataclass
class Plan:
    model: str
    architecture: str
    quantization: str
    kv_dtype: str
    ctx: int
    ram: int
    modules: list[ModuleRow]
    kv_bytes_per_token: int
    kv_bytes: int
    overhead_bytes: int
    total_bytes: int
    fits: bool
    suggestions: list[str]
    notes: list[str] = field(default_factory=list)
    image_bytes: int = 0  # peak of one image through the vision encoder (autoglm.tools.image_memory); in total_bytes
    image_patches: int = 0
    image_size: tuple[int, int] | None = None  # (width, height) planned for; None: the processor's largest image

    @property
    def weight_bytes(self) -> int:
        return sum(m.bytes for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_bytes"] = self.weight_bytes
        return d

    def render(self) -> str:
        lines = [
            f"model: {self.model} ({self.architecture}), quantization: {self.quantization}, "
            f"KV cache: {self.kv_dtype}, context: {self.ctx} tokens, RAM: {human(self.ram)}",
            "",
            f"{'module':<14}{'parameters':>16}{'bytes':>14}  formats",
        ]
        for m in self.modules:
            fmts = ", ".join(f"{k} {human(v)}" for k, v in sorted(m.formats.items(), key=lambda kv: -kv[1]))
            lines.append(f"{m.name:<14}{m.parameters:>16,}{human(m.bytes):>14}  {fmts}")
        lines += [
            f"{'weights':<14}{sum(m.parameters for m in self.modules):>16,}{human(self.weight_bytes):>14}",
            f"{'KV cache':<14}{'':>16}{human(self.kv_bytes):>14}  {self.kv_bytes_per_token:,} bytes/token x {self.ctx}",
            f"{'runtime':<14}{'':>16}{human(self.overhead_bytes):>14}  interpreter + activations (estimate)",
        ]
        if self.image_patches:
            which = "the largest image" if self.image_size is None else "a {}x{} image".format(*self.image_size)
            lines.append(f"{'image':<14}{'':>16}{human(self.image_bytes):>14}  {which}: {self.image_patches:,} patches")
        lines += [
            f"{'total':<14}{'':>16}{human(self.total_bytes):>14}",
            "",
            f"{'FITS' if self.fits else 'DOES NOT FIT'} in {human(self.ram)} "
            f"({'headroom' if self.fits else 'over by'} {human(abs(self.ram - self.total_bytes))})",
        ]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"- {s}" for s in self.suggestions]
        return "\n".join(lines)


# --- model description from config.json --------------------------------------------------------------------------
def _text_section(config: dict[str, Any]) -> dict[str, Any]:
    text = dict(config.get("text_config") or {})
    for k, v in config.items():  # top-level values fill what text_config lacks (flat GLM-4 / Gemma configs)
        if k not in ("text_config", "vision_config"):
            text.setdefault(k, v)
    return text


def describe_config(config: dict[str, Any], *, no_vision: bool = False) -> tuple[str, list[Tensor2D], dict[str, int]]:
    """(architecture, weights, attention dims {layers, kv_heads, head_dim}) from a config.json dict: the registry's
    model is built on `meta` and its real parameter shapes are listed (a tied lm_head counted once)."""
    import torch

    from autoglm.layers.attention import Attention
    from autoglm.models.registry import hf_spec

    spec = hf_spec(config)
    with torch.device("meta"):
        model = spec.build(config, no_vision)
    vp = spec.vision_prefix
    attns = [m for n, m in model.named_modules() if isinstance(m, Attention) and not (vp and n.startswith(vp))]
    names = _gguf_names(spec.module, len(attns), [n for n, _ in model.named_parameters()])
    out: list[Tensor2D] = []
    for name, p in model.named_parameters():  # deduplicated: a tied lm_head is the embedding
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if vp is not None and name.startswith(vp):
            module = "vision"
        elif "embed_tokens" in name:
            module = "embeddings"
        elif name.startswith("lm_head"):
            module = "lm_head"
        elif "norm" in name:
            module = "norms"
        elif ".self_attn." in name:
            module = "attention"
        else:
            module = "mlp"
        linear = p.dim() == 2 and module not in ("embeddings", "norms")
        out.append(
            Tensor2D(names.get(name, name), tuple(p.shape), module, int(layer.group(1)) if layer else None, linear)
        )
    attn = {"layers": len(attns), "kv_heads": attns[0].num_kv_heads, "head_dim": attns[0].head_dim}
    return spec.architecture, out, attn


def _gguf_names(module: Any, n_layers: int, params: list[str]) -> dict[str, str]:
    """Our parameter name -> the GGUF tensor name llama.cpp would write (the Q4_K_M recipe is keyed by it)."""
    import gguf

    arch = getattr(module, "GGUF_ARCH", None)
    by_name = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        return {}
    tmap = gguf.get_tensor_name_map(by_name[arch], n_layers)
    out: dict[str, str] = {}
    for p in params:
        g = tmap.get_name(p, try_suffixes=(".weight", ".bias"))
        if g is None and p.startswith("language_model."):  # GLM-4.1V: our text model sits under language_model
            g = tmap.get_name("model." + p.removeprefix("language_model."), try_suffixes=(".weight", ".bias"))
        if g is not None:
            out[p] = g
    return out


# --- pricing ------------------------------------------------------------------------------------------------------
def _gguf_bytes(qtype_name: str, numel: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype_name]]
    return numel // block * size


def _gguf_type(w: Tensor2D, quant: str, n_layers: int) -> str:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if quant == "q8_0":
        return "Q8_0" if w.shape[-1] % 32 == 0 else "F16"
    name = w.name if w.module != "lm_head" else "output.weight"
    try:
        from autoglm.gguf.quants import q4_k_m_type_for

        return q4_k_m_type_for(name, w.layer, n_layers, n_cols=w.shape[-1]).name
    except ImportError:  # the GGUF block-format module is optional for planning
        block = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][0]
        return "Q4_K" if w.shape[-1] % block == 0 else "Q5_0"


def price(w: Tensor2D, quant: str, dtype: str, n_layers: int) -> tuple[str, int]:
    """(format label, bytes) for one weight under a quantization choice."""
    dense = _DTYPE_BYTES.get(dtype, 2)
    if w.module == "vision":
        # HF path: the vision tower stays in the checkpoint dtype (autoglm.quant.apply). GGUF: a Q8_0 mmproj (llama.cpp
        # publishes F16 and Q8_0 ones; 4-bit vision weights hurt GUI grounding): the loader keeps its linears in
        # blocks and dequantizes the rest (convolutions, position table, norms) to float32 (gguf/mmproj.py)
        if quant in ("q8_0", "q4_k_m"):
            if w.linear and w.shape[-1] % 32 == 0:
                return "Q8_0", _gguf_bytes("Q8_0", w.numel)
            return MMPROJ_HELD, w.numel * 4
        return dtype, w.numel * dense
    if not w.linear or len(w.shape) != 2:
        if quant in ("q8_0", "q4_k_m"):
            if w.module == "embeddings":
                qt = "Q8_0" if quant == "q8_0" else "Q4_K"
                return qt, _gguf_bytes(qt, w.numel)
            return "float32", w.numel * 4
        return dtype, w.numel * dense
    rows, cols = w.shape
    if quant == "none":
        return dtype, w.numel * dense
    if quant == "int8" or (quant == "int4" and (w.module == "lm_head" or cols % INT4_GROUP)):
        return "int8", w.numel + rows * 4
    if quant == "int4":
        return "int4", w.numel // 2 + (cols // INT4_GROUP) * rows * 4
    qt = _gguf_type(w, quant, n_layers)
    return qt, _gguf_bytes(qt, w.numel)


# --- the plan -----------------------------------------------------------------------------------------------------
_MODULE_ORDER = ("embeddings", "attention", "mlp", "norms", "lm_head", "vision")


def _overhead(config: dict[str, Any], chunk: int) -> int:
    t = _text_section(config)
    d, inter = int(t["hidden_size"]), int(t["intermediate_size"])
    heads = int(t["num_attention_heads"])
    hd = int(t.get("head_dim") or d // heads)
    # one prefill chunk of float32 activations: residual + norms, q/k/v/attn out, gate/up (2I) + act (I)
    per_token = (6 * d + 4 * heads * hd + 3 * inter) * 4
    return RUNTIME_BASE_BYTES + chunk * per_token + 8 * int(t["vocab_size"]) * 4


def make_plan(
    weights: list[Tensor2D],
    *,
    model: str,
    architecture: str,
    attn: dict[str, int],
    overhead: int,
    ctx: int,
    ram: int,
    quantization: str,
    kv_dtype: str,
    dtype: str,
    priced: dict[str, tuple[str, int]] | None = None,
) -> Plan:
    rows: dict[str, ModuleRow] = {}
    for w in weights:
        fmt, nbytes = priced[w.name] if priced is not None else price(w, quantization, dtype, attn["layers"])
        row = rows.setdefault(w.module, ModuleRow(w.module, 0, 0))
        row.parameters += w.numel
        row.bytes += nbytes
        row.formats[fmt] = row.formats.get(fmt, 0) + nbytes
    modules = [rows[m] for m in _MODULE_ORDER if m in rows]
    kv_per_token = attn["layers"] * 2 * attn["kv_heads"] * attn["head_dim"] * KV_DTYPES[kv_dtype]
    kv = kv_per_token * ctx
    total = sum(m.bytes for m in modules) + kv + overhead
    return Plan(
        model=model,
        architecture=architecture,
        quantization=quantization,
        kv_dtype=kv_dtype,
        ctx=ctx,
        ram=ram,
        modules=modules,
        kv_bytes_per_token=kv_per_token,
        kv_bytes=kv,
        overhead_bytes=overhead,
        total_bytes=total,
        fits=total <= ram,
        suggestions=[],
    )


def plan_config(
    config: dict[str, Any],
    *,
    model: str = "model",
    ctx: int = 4096,
    ram: int | str = "8GB",
    quantization: str = "none",
    kv_dtype: str | None = None,
    no_vision: bool = False,
    chunk: int = 512,
    suggest: bool = True,
    image_size: tuple[int, int] | None = None,
    processor: ImageProcessorConfig | None = None,
) -> Plan:
    """Plan for an HF config.json dict (weights not needed). With a vision tower, one image's working set is
    added: an image of `image_size` (width, height), else the largest `processor` (preprocessor_config.json;
    default GLM-4.1V's) lets through."""
    if quantization not in QUANTIZATIONS:
        raise InvalidRequest(f"unknown quantization {quantization!r}; one of {', '.join(QUANTIZATIONS)}")
    t = _text_section(config)
    dtype = str(t.get("torch_dtype") or t.get("dtype") or "bfloat16").removeprefix("torch.")
    dtype = dtype if dtype in _DTYPE_BYTES else "bfloat16"
    kv_dtype = kv_dtype or dtype
    if kv_dtype not in KV_DTYPES:
        raise InvalidRequest(f"unknown KV dtype {kv_dtype!r}; one of {', '.join(KV_DTYPES)}", param="kv_dtype")
    arch, weights, attn = describe_config(config, no_vision=no_vision)
    plan = make_plan(
        weights,
        model=model,
        architecture=arch,
        attn=attn,
        overhead=_overhead(config, chunk),
        ctx=ctx,
        ram=parse_bytes(ram),
        quantization=quantization,
        kv_dtype=kv_dtype,
        dtype=dtype,
    )
    if any(w.module == "vision" for w in weights) and "hidden_size" in (config.get("vision_config") or {}):
        act = 4 if quantization in ("q8_0", "q4_k_m") else _DTYPE_BYTES[dtype]  # GGUF: the tower runs in float32
        _add_image(plan, config["vision_config"], processor or ImageProcessorConfig(), act, image_size)
    if ctx > int(t.get("max_position_embeddings", ctx)):
        plan.notes.append(f"context {ctx} exceeds the model's max_position_embeddings {t['max_position_embeddings']}")
    if suggest:
        kw = dict(model=model, ctx=ctx, ram=ram, kv_dtype=kv_dtype, no_vision=no_vision, chunk=chunk, suggest=False,
                  image_size=image_size, processor=processor)
        plan.suggestions = _suggestions(
            plan, lambda **o: plan_config(config, **{**kw, **o}), has_vision=any(w.module == "vision" for w in weights)
        )
    return plan


def _add_image(
    plan: Plan, vision: dict[str, Any], cfg: ImageProcessorConfig, act_bytes: int, size: tuple[int, int] | None
) -> None:
    if size is not None and size[0] * size[1] > MediaPolicy.max_pixels:
        raise InvalidRequest(
            f"a {size[0]}x{size[1]} image ({size[0] * size[1]:,} pixels) is over the server's limit of "
            f"{MediaPolicy.max_pixels:,} pixels (--max-image-pixels): it would be refused, not planned for",
            param="image",
        )
    mem = image_memory(vision, cfg, act_bytes, size)
    plan.image_bytes, plan.image_patches, plan.image_size = mem.peak_bytes, mem.patches, size
    plan.total_bytes += mem.peak_bytes
    plan.fits = plan.total_bytes <= plan.ram
    plan.notes.append(
        "the encoder cache can keep up to 256 MiB more of image embeddings (EngineConfig.encoder_cache_memory), "
        "not counted"
    )


def _suggestions(plan: Plan, replan: Any, *, has_vision: bool) -> list[str]:
    out: list[str] = []
    fixed = plan.total_bytes - plan.kv_bytes
    if plan.fits:
        spare = (plan.ram - fixed) // max(plan.kv_bytes_per_token, 1)
        out.append(f"fits with {human(plan.ram - plan.total_bytes)} to spare; the KV cache could hold ~{spare} tokens")
        return out
    for q in QUANTIZATIONS:
        if q != plan.quantization and replan(quantization=q).fits:
            out.append(f"--quantization {q} fits ({human(replan(quantization=q).total_bytes)} total)")
    if plan.ram > fixed:
        max_ctx = (plan.ram - fixed) // plan.kv_bytes_per_token
        out.append(f"a context of {max_ctx} tokens fits with {plan.quantization} weights (--ctx {max_ctx})")
    if plan.kv_dtype == "float32":
        alt = replan(kv_dtype="bfloat16", quantization=plan.quantization)
        out.append(f"--kv-dtype bfloat16 halves the KV cache ({'fits' if alt.fits else 'still too big'})")
    if plan.image_patches and plan.image_size is None:
        shot = replan(quantization=plan.quantization, image_size=PHONE_SCREENSHOT)
        if shot.fits:
            out.append(
                f"a phone screenshot fits (--image {PHONE_SCREENSHOT[0]}x{PHONE_SCREENSHOT[1]}: "
                f"{human(shot.image_bytes)} instead of {human(plan.image_bytes)} for the largest image); "
                "preprocessor_config.json's size.longest_edge caps the pixels larger images are resized to"
            )
    if has_vision:
        vision = next((m.bytes for m in plan.modules if m.name == "vision"), 0)
        alt = replan(no_vision=True, quantization=plan.quantization)
        verdict = "fits" if alt.fits else "still too big"
        out.append(f"--no-vision drops the vision tower ({human(vision)}; text only): {verdict}")
    if not out:
        out.append("no single change fits; combine a smaller quantization, a shorter context and --no-vision")
    return out


def plan_gguf(
    path: str | Path,
    *,
    mmproj: str | Path | None = None,
    ctx: int = 4096,
    ram: int | str = "8GB",
    kv_dtype: str = "float32",
    chunk: int = 512,
    image_size: tuple[int, int] | None = None,
) -> Plan:
    """Plan for a GGUF file from its metadata and tensor types (the file's own quantization); with an mmproj, its
    tower as the loader holds it (block-quantized linears in their blocks, the rest float32) and one image of
    `image_size` (default: the largest its processor allows)."""
    from autoglm.errors import CorruptFile
    from autoglm.gguf.reader import GGUFFile

    f = GGUFFile(path)  # our reader: bounded parsing of hostile headers, errors naming the file and the key

    def meta(key: str, default: Any = None) -> Any:
        return f.metadata.get(key, default)

    def count(key: str, default: Any = None) -> int:
        value = meta(key, default)
        if value is not None and not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            value = max(value) if len(value) else None  # per-layer arrays (e.g. head_count_kv): the largest
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise CorruptFile(f"{f.path}: {key} is {value!r}, not a count") from None
        if n < 1:
            raise CorruptFile(f"{f.path}: {key} is {n}; it must be at least 1")
        return n

    arch = meta("general.architecture", "?")
    n_layers = count(f"{arch}.block_count")
    d = count(f"{arch}.embedding_length")
    heads = count(f"{arch}.attention.head_count")
    kv_heads = count(f"{arch}.attention.head_count_kv", heads)
    hd = count(f"{arch}.attention.key_length", d // heads)
    weights: list[Tensor2D] = []
    priced: dict[str, tuple[str, int]] = {}
    types: dict[str, int] = {}
    for t in f.tensors.values():
        name = t.name
        module = (
            "embeddings"
            if name.startswith("token_embd")
            else "lm_head"
            if name.startswith("output.")
            else "norms"
            if "norm" in name
            else "attention"
            if ".attn_" in name
            else "mlp"
            if ".ffn_" in name
            else "norms"
        )
        weights.append(Tensor2D(name, tuple(t.shape), module, linear=False))
        priced[name] = (t.qtype.name, t.nbytes)
        types[t.qtype.name] = types.get(t.qtype.name, 0) + t.nbytes
    if mmproj is not None:
        for t in GGUFFile(mmproj).tensors.values():
            name = "mmproj:" + t.name
            weights.append(Tensor2D(name, tuple(t.shape), "vision", linear=False))
            kept = len(t.shape) == 2 and t.qtype.name not in ("F32", "F16", "BF16") and "position" not in name
            # the loader keeps block-quantized linears in their blocks (gguf/mmproj.py), the rest in float32
            priced[name] = (t.qtype.name, t.nbytes) if kept else (MMPROJ_HELD, t.n_elements * 4)
    main_type = max(types, key=lambda k: types[k]) if types else "?"
    cfg = {
        "hidden_size": d,
        "intermediate_size": count(f"{arch}.feed_forward_length", 4 * d),
        "num_attention_heads": heads,
        "head_dim": hd,
        "vocab_size": len(meta("tokenizer.ggml.tokens", [])) or 32000,
    }
    plan = make_plan(
        weights,
        model=str(path),
        architecture=f"gguf:{arch}",
        attn={"layers": n_layers, "kv_heads": kv_heads, "head_dim": hd},
        overhead=_overhead(cfg, chunk),
        ctx=ctx,
        ram=parse_bytes(ram),
        quantization=f"gguf ({main_type} mostly)",
        kv_dtype=kv_dtype,
        dtype="float16",
        priced=priced,
    )
    if mmproj is not None:
        from autoglm.gguf import mmproj as mm

        f = mm.open_mmproj(mmproj)
        if mm.projector_type(f) in mm.SUPPORTED_PROJECTORS:
            vc = mm.vision_config(f)
            _add_image(plan, asdict(vc), mm.image_processor_config(f, vc), 4, image_size)
        else:  # the loader refuses it too; the plan still prices its tensors
            plan.notes.append(f"projector type {mm.projector_type(f)!r}: no image working set estimated")
    fixed = plan.total_bytes - plan.kv_bytes
    if plan.fits:
        plan.suggestions = [f"fits; the KV cache could hold ~{(plan.ram - fixed) // plan.kv_bytes_per_token} tokens"]
    else:
        plan.suggestions = [
            "a smaller GGUF type (e.g. `autoglm quantize IN.gguf OUT.gguf q4_k_m`) or a shorter context"
        ]
        if plan.ram > fixed:
            plan.suggestions.append(f"--ctx {(plan.ram - fixed) // plan.kv_bytes_per_token} fits")
    return plan


def plan_model(model: str, **kwargs: Any) -> Plan:
    """MODEL: a built-in name (autoglm-phone-9b), an HF directory or config.json, or a GGUF file."""
    key = model.lower()
    if key in BUILTIN_CONFIGS:
        kwargs.pop("mmproj", None)
        return plan_config(BUILTIN_CONFIGS[key], model=model, **kwargs)  # GLM-4.1V's image processor defaults
    p = Path(model).expanduser()
    if p.is_file():
        with p.open("rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            kwargs.pop("no_vision", None)
            kwargs.pop("processor", None)
            q = kwargs.pop("quantization", "none")
            if q != "none":
                raise InvalidRequest(
                    f"{p} is a GGUF file: its quantization is fixed ({q!r} given)", param="quantization"
                )
            # the engine runs GGUF models in float32 and its KV cache in the decoder's dtype (kv_cache_dtype auto)
            kv = kwargs.pop("kv_dtype", None) or "float32"
            return plan_gguf(p, kv_dtype=kv, **kwargs)
        config_path = p
    else:
        config_path = p / "config.json"
    if not config_path.is_file():
        raise ConfigError(
            f"{model}: not a built-in model ({', '.join(BUILTIN_CONFIGS)}), a GGUF file or a directory with config.json"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config_path}: invalid JSON: {e}") from e
    kwargs.pop("mmproj", None)
    if "processor" not in kwargs and config_path.parent.joinpath("preprocessor_config.json").is_file():
        kwargs["processor"] = ImageProcessorConfig.from_dir(config_path.parent)
    return plan_config(config, model=model, **kwargs)
