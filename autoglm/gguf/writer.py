"""HF model directory -> GGUF: the text model (any registry architecture with a `GGUF_ARCH`) and the vision
projector (`mmproj`, projector type `glm4v`).

Writes what llama.cpp's `convert_hf_to_gguf.py` writes for `Glm4ForCausalLM` / `Glm4vForConditionalGeneration`
(names, metadata keys, layouts; `tests/interop/test_convert.py` compares the two files key by key and tensor by
tensor), with our own quantizers for the types the converter cannot write (Q4_K_M). What the converter does and we
mirror:
- tensor names from the `gguf` package's tables (`get_tensor_name_map`), `language_model.` stripped;
- layouts the converter changes, from the architecture module (`gguf_export_fixups`: GLM-4.1V text q/k rows to
  NeoX halves, Llama q/k rows to interleaved pairs, Gemma norms + 1);
- vision: the Conv3d patch kernel split along time into `v.patch_embd.weight` / `.weight.1`;
- types: 1-D tensors, norms, biases and position tables stay F32; patch/merger convolutions F32 (F16 for f16);
  rows that are not whole blocks fall back (Q8_0 -> F16, K-quants as llama.cpp's quantizer does).
Tensors are written one at a time (header first, then each tensor converted and appended): peak memory is one
tensor, not the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from torch import Tensor, nn

from autoglm.errors import ConfigError, ModelLoadError, UnsupportedArchitecture, WeightMismatch
from autoglm.gguf.quants import QuantMix, quantize, row_nbytes
from autoglm.models.registry import ModelSpec, hf_spec

log = logging.getLogger(__name__)
Q = GGMLQuantizationType

_ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
OUTTYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
# The projector is small and image quality is sensitive to it: a q4_k_m model gets a Q8_0 mmproj (as published).
MMPROJ_OUTTYPE = {"f32": "f32", "f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "q4_k_m": "q8_0"}


# --- reading the HF directory ----------------------------------------------------------------------------------
class HFCheckpoint:
    """config.json + safetensors tensors (single file or sharded index) of one HF model directory."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise ModelLoadError(f"{self.path}: no config.json (expected a Hugging Face model directory)")
        self.config: dict[str, Any] = json.loads(cfg.read_text(encoding="utf-8"))
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.path}: no *.safetensors weights")
        self._handles = [safe_open(str(self.path / f), framework="pt") for f in files]
        self.where: dict[str, Any] = {}
        for h in self._handles:
            for k in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                self.where[k] = h

    @property
    def architecture(self) -> str:
        return self.spec.architecture

    @property
    def spec(self) -> ModelSpec:
        """The registry's spec of the checkpoint; its module must say which GGUF architecture it writes."""
        spec = hf_spec(self.config, source=str(self.path / "config.json"))
        if getattr(spec.module, "gguf_export_fixups", None) is None:
            raise UnsupportedArchitecture(f"{self.path}: {spec.architecture} has no GGUF architecture to convert to")
        return spec

    def meta_model(self) -> nn.Module:
        """The model built on `meta` from config.json (its shapes and the export layout, no weights)."""
        with torch.device("meta"):
            return self.spec.build(self.config, True)

    def names(self) -> list[str]:
        return sorted(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def tensor(self, name: str) -> Tensor:
        return self.where[name].get_tensor(name).to(torch.float32)


def text_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The converter's view of a text config: `text_config` lifted to the top level."""
    return {**config, **config.get("text_config", {})}


def rope_parameters(hp: dict[str, Any]) -> dict[str, Any]:
    """rope_parameters (transformers 5) or rope_scaling + top-level rope_theta / partial_rotary_factor (older)."""
    rp = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in rp and hp.get(key) is not None:
            rp[key] = hp[key]
    if "rope_type" not in rp and "type" in rp:
        rp["rope_type"] = rp["type"]
    return rp


# --- planning -------------------------------------------------------------------------------------------------
@dataclass
class TensorPlan:
    """One output tensor: its GGUF name, torch-order shape, type and how to make its float data."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    make: Callable[[], Tensor]

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return rows * row_nbytes(self.qtype, self.shape[-1], self.name)


def _float_type(mix: QuantMix) -> GGMLQuantizationType:
    return Q.F16 if mix.name == "f16" else Q.F32


def _text_type(mix: QuantMix, name: str, shape: tuple[int, ...], n_layers: int, tied: bool) -> GGMLQuantizationType:
    # the converter: 1-D, norms and non-`.weight` tensors are F32; everything else the target type
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    return mix.type_for(name, shape, n_layers, tied_embeddings=tied)


def _mmproj_type(mix: QuantMix, name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
    if ".patch_embd.weight" in name or ".patch_merger.weight" in name:
        return _float_type(mix)  # ggml's conv kernels want F16/F32
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or "position_embd" in name:
        return Q.F32
    return mix.type_for(name, shape, 0)


def plan_text(ckpt: HFCheckpoint, mix: QuantMix) -> list[TensorPlan]:
    hp = text_hparams(ckpt.config)
    n_layers = int(hp["num_hidden_layers"])
    arch = ckpt.spec.module.GGUF_ARCH
    tmap = gguf.get_tensor_name_map(_ARCH_BY_NAME[arch], n_layers)
    fix = ckpt.spec.module.gguf_export_fixups(ckpt.meta_model())  # the converter's layout (q/k order, norms)
    tied = bool(hp.get("tie_word_embeddings", False))
    plans: list[TensorPlan] = []
    for hf_name in ckpt.names():
        if "visual." in hf_name or hf_name.endswith(".rotary_emb.inv_freq"):
            continue
        short = hf_name.replace("language_model.", "")
        name = tmap.get_name(short, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise WeightMismatch(f"{ckpt.path}: tensor {hf_name!r} has no GGUF name for architecture {arch}")
        shape = ckpt.shape(hf_name)

        def make(n: str = hf_name) -> Tensor:
            return fix(n, ckpt.tensor(n))

        plans.append(TensorPlan(name, shape, _text_type(mix, name, shape, n_layers, tied), make))
    return plans


def plan_mmproj(ckpt: HFCheckpoint, mix: QuantMix) -> list[TensorPlan]:
    vc = ckpt.config.get("vision_config")
    if not vc:
        raise ConfigError(f"{ckpt.path}: config.json has no vision_config (nothing to write into an mmproj)")
    vmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, int(vc["depth"]))
    patch = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH]
    plans: list[TensorPlan] = []
    for hf_name in ckpt.names():
        if "visual." not in hf_name:
            continue
        short = hf_name[hf_name.index("visual.") :]
        shape = ckpt.shape(hf_name)
        if short == "visual.patch_embed.proj.weight":
            # Conv3d [out, C, T=2, P, P] -> two Conv2d kernels, one per frame of a temporal patch (llama.cpp's layout)
            if len(shape) != 5 or shape[2] != 2:
                raise ConfigError(f"{ckpt.path}: {hf_name} {shape}: only temporal_patch_size 2 is supported")
            kshape = (shape[0], shape[1], shape[3], shape[4])
            for t, suffix in ((0, ".weight"), (1, ".weight.1")):
                qt = _mmproj_type(mix, patch + suffix, kshape)
                plans.append(TensorPlan(patch + suffix, kshape, qt, lambda n=hf_name, t=t: ckpt.tensor(n)[:, :, t]))
            continue
        name = vmap.get_name(short, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise WeightMismatch(f"{ckpt.path}: vision tensor {hf_name!r} has no GGUF name for projector glm4v")
        plans.append(TensorPlan(name, shape, _mmproj_type(mix, name, shape), lambda n=hf_name: ckpt.tensor(n)))
    return plans


# --- metadata -------------------------------------------------------------------------------------------------
def _meta_model(w: GGUFWriter, ckpt: HFCheckpoint, plans: list[TensorPlan], model_name: str | None) -> None:
    total = sum(int(np.prod(p.shape)) for p in plans)
    meta = gguf.Metadata.load(None, ckpt.path, model_name, total)
    if meta.name is None:
        meta.name = ckpt.path.name
    gen_path = ckpt.path / "generation_config.json"
    if meta.sampling_penalty_repeat is None and gen_path.is_file():
        # newer gguf-py (the converter's) also reads repetition_penalty
        meta.sampling_penalty_repeat = json.loads(gen_path.read_text(encoding="utf-8")).get("repetition_penalty")
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, total, 0, 0)
    meta.set_gguf_meta_model(w)


def _text_params(w: GGUFWriter, hp: dict[str, Any], mix: QuantMix, rotary_dim: int) -> None:
    rp = rope_parameters(hp)
    n_head = int(hp["num_attention_heads"])
    w.add_block_count(int(hp["num_hidden_layers"]))
    if (n_ctx := hp.get("max_position_embeddings")) is not None:
        w.add_context_length(int(n_ctx))
    w.add_embedding_length(int(hp["hidden_size"]))
    w.add_feed_forward_length(int(hp["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(hp.get("num_key_value_heads", n_head)))
    rope_type, factor = rp.get("rope_type"), rp.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    elif rope_type not in (None, "default"):
        raise ConfigError(f"rope type {rope_type!r} cannot be written to GGUF", param="rope_parameters.rope_type")
    if "mrope_section" in rp:
        sections = [int(s) for s in rp["mrope_section"]]
        w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])  # [time, height, width, extra]
    if (theta := rp.get("rope_theta")) is not None:
        w.add_rope_freq_base(float(theta))
    if (eps := hp.get("rms_norm_eps")) is not None:
        w.add_layer_norm_rms_eps(float(eps))
    if (head_dim := hp.get("head_dim")) is not None:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_file_type(mix.file_type)
    w.add_rope_dimension_count(rotary_dim)


def _rotary_dim(model: nn.Module) -> int:
    """RoPE dims per head: GLM's partial rotary, else the whole head."""
    cfg = model.config  # type: ignore[union-attr]
    return int(getattr(cfg, "rotary_dim", 0) or cfg.head_dim)


# GLM-4's split regex (tokenizer.json spelling); llama.cpp implements it as the "glm4" pre-tokenizer.
GLM4_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(data: dict[str, Any], path: Path) -> str:
    """`tokenizer.ggml.pre` from the pre-tokenizer itself (llama.cpp's converter hashes known vocabularies instead):
    GLM-4's = Llama 3's split regex + byte-level -> "glm4" ("llama-bpe" when the BPE ignores merges, as Llama 3's
    does), Qwen2's -> "qwen2", byte-level alone -> "gpt-2", byte-level after single digits -> "smollm"."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = "ByteLevel" in kinds
    if regexes == [GLM4_SPLIT_REGEX] and byte_level:
        return "llama-bpe" if data.get("model", {}).get("ignore_merges") else "glm4"
    if regexes == [QWEN2_SPLIT_REGEX] and byte_level:
        return "qwen2"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    raise ConfigError(f"{path}: pre-tokenizer {kinds} {regexes} has no llama.cpp pre-tokenizer name we know")


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _vocab(w: GGUFWriter, ckpt: HFCheckpoint, vocab_size: int, arch: str) -> None:
    """BPE vocabulary from tokenizer.json: tokens padded to the embedding rows, types, merges, specials, template."""
    tok_path = ckpt.path / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelLoadError(f"{ckpt.path}: no tokenizer.json (the GGUF needs the vocabulary)")
    data = json.loads(tok_path.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "BPE":
        raise ConfigError(f"{tok_path}: tokenizer model {data.get('model', {}).get('type')!r} is not BPE")
    reverse = {int(i): t for t, i in data["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in data.get("added_tokens", [])}
    for i, a in added.items():
        reverse[i] = a["content"]
    if max(reverse) >= vocab_size:
        raise ConfigError(f"{tok_path}: token id {max(reverse)} >= vocab_size {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            special = added[i].get("special") or _looks_special(reverse[i])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(data, tok_path))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(ckpt.path, load_merges=True)
    by_text = {a["content"]: i for i, a in added.items()}
    if arch == "glm4":
        # GLM-4's fixed roles, as the converter sets them: <|endoftext|> is eos/unk/bos, <|user|> ends a turn
        roles = (("eos", "<|endoftext|>"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"), ("bos", "<|endoftext|>"))
        for role, text in roles:
            if text in by_text:
                special.special_token_ids[role] = by_text[text]
    post = data.get("post_processor") or {}
    if post.get("type") == "ByteLevel":  # a byte-level post-processor adds nothing (the converter's gguf-py reads so)
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(w, quiet=True)


def _mmproj_params(w: GGUFWriter, ckpt: HFCheckpoint, mix: QuantMix) -> None:
    vc = ckpt.config["vision_config"]
    text = text_hparams(ckpt.config)
    pre_path = ckpt.path / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text(encoding="utf-8")) if pre_path.is_file() else {}
    if "image_mean" not in pre or "image_std" not in pre:
        raise ConfigError(f"{pre_path}: image_mean / image_std missing (the mmproj records the normalisation)")
    w.add_file_type(mix.file_type)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(int(text["hidden_size"]))
    w.add_vision_image_size(int(vc["image_size"]))
    w.add_vision_patch_size(int(vc["patch_size"]))
    w.add_vision_embedding_length(int(vc["hidden_size"]))
    w.add_vision_feed_forward_length(int(vc["intermediate_size"]))
    w.add_vision_block_count(int(vc["depth"]))
    w.add_vision_head_count(int(vc["num_heads"]))
    w.add_vision_image_mean([float(x) for x in pre["image_mean"]])
    w.add_vision_image_std([float(x) for x in pre["image_std"]])
    w.add_clip_projector_type(gguf.VisionProjectorType.GLM4V)
    act = str(vc.get("hidden_act", "")).lower()
    if act == "gelu":
        w.add_vision_use_gelu(True)
    elif act == "silu":
        w.add_vision_use_silu(True)
    w.add_vision_attention_layernorm_eps(float(vc.get("rms_norm_eps", 1e-5)))


# --- writing --------------------------------------------------------------------------------------------------
def _encode(plan: TensorPlan) -> np.ndarray:
    x = plan.make()
    if tuple(x.shape) != plan.shape:
        raise WeightMismatch(f"tensor {plan.name!r}: made {tuple(x.shape)}, planned {plan.shape}")
    if plan.qtype == Q.F32:
        return x.contiguous().numpy().astype(np.float32, copy=False)
    if plan.qtype == Q.F16:
        return x.to(torch.float16).contiguous().numpy()
    return quantize(x, plan.qtype, plan.name)


def _write(
    path: Path, arch: str, plans: list[TensorPlan], metadata: Callable[[GGUFWriter], None], progress: bool, desc: str
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    w = GGUFWriter(tmp, arch)
    metadata(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for p in plans:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for data in _progress(plans, progress, desc):
        w.write_tensor_data(data)
    w.close()
    tmp.replace(path)  # a crash never leaves a half-written file under the final name
    return path


def _progress(plans: list[TensorPlan], enabled: bool, desc: str) -> Iterator[np.ndarray]:
    from tqdm import tqdm

    with tqdm(total=sum(p.nbytes for p in plans), unit="B", unit_scale=True, desc=desc, disable=not enabled) as bar:
        for p in plans:
            data = _encode(p)
            yield data
            bar.update(p.nbytes)


def convert_text(
    hf_dir: str | Path, out: str | Path, *, outtype: str = "f16", model_name: str | None = None, progress: bool = False
) -> Path:
    """Write the text model of `hf_dir` (GLM-4 / GLM-4.1V -> `glm4`, Llama -> `llama`, Qwen2/3, Gemma 3) as a GGUF
    at `out`; -> `out`."""
    mix = _mix(outtype)
    ckpt = HFCheckpoint(hf_dir)
    ckpt.architecture  # noqa: B018 (raises UnsupportedArchitecture)
    hp = text_hparams(ckpt.config)
    plans = plan_text(ckpt, mix)
    vocab_size = int(hp["vocab_size"])
    model = ckpt.meta_model()

    def metadata(w: GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        _meta_model(w, ckpt, plans, model_name)
        _text_params(w, hp, mix, _rotary_dim(model))
        _vocab(w, ckpt, vocab_size, ckpt.spec.module.GGUF_ARCH)

    return _write(Path(out), ckpt.spec.module.GGUF_ARCH, plans, metadata, progress, "text")


def convert_mmproj(
    hf_dir: str | Path, out: str | Path, *, outtype: str = "f16", model_name: str | None = None, progress: bool = False
) -> Path:
    """Write the vision tower + projector of a GLM-4.1V `hf_dir` as an mmproj GGUF (`clip`, projector `glm4v`)."""
    mix = _mix(MMPROJ_OUTTYPE.get(outtype.lower(), outtype))
    ckpt = HFCheckpoint(hf_dir)
    if ckpt.architecture != "Glm4vForConditionalGeneration":
        raise UnsupportedArchitecture(f"{ckpt.path}: {ckpt.architecture} has no vision tower to write as an mmproj")
    plans = plan_mmproj(ckpt, mix)

    def metadata(w: GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MMPROJ)
        _meta_model(w, ckpt, plans, model_name)
        _mmproj_params(w, ckpt, mix)

    return _write(Path(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ], plans, metadata, progress, "mmproj")


def _mix(outtype: str) -> QuantMix:
    if outtype.lower() not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype!r} is not supported (choose from {', '.join(OUTTYPES)})",
                          param="outtype")
    return QuantMix.parse(outtype)


__all__ = ["OUTTYPES", "convert_mmproj", "convert_text"]
