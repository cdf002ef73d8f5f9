"""mmproj GGUF (llama.cpp's vision projector file) -> the GLM-4.1V vision tower as an image `Encoder`.

The file is what `convert_hf_to_gguf.py --mmproj` writes for `Glm4vForConditionalGeneration`: `general.architecture`
`clip`, `clip.projector_type` `glm4v`, `clip.vision.*` hyper-parameters, `v.*` (tower) and `mm.*` (merger) tensors
named by the `gguf` package's MMPROJ table, the Conv3d patch kernel split into two frames
(`v.patch_embd.weight`, `v.patch_embd.weight.1`). We rebuild `autoglm.models.glm4v_vision.Glm4vVisionModel` from it.

With the decoder's CPU kernels (`kernels`, the GGUF loader's), every block-quantized linear of the tower stays in
its file blocks as a `GGUFLinear` (packed by `prepare_weights` here, like the decoder's): a Q8_0 mmproj of the 9B holds
0.9 GiB instead of 3.3 GiB of float32, and its matmuls run on the int8 kernels (per-32 int8 activations, as
llama.cpp's clip computes a Q8_0 projector). F32/F16/BF16 tensors, the patch and merge convolutions, the position
table and the norms are float (`dtype`), and the norms, the rotary and silu * up run on the same kernels; without
kernels (CUDA, or none built) the whole tower is dequantized and runs in torch.

Rules (issue 4): the projection size (`clip.vision.projection_dim`) must equal the text model's embedding size, and
the projector type must be one the text model can use (`glm4v` needs the GLM-4.1V text model, i.e. M-RoPE); each
mismatch is a `ModelLoadError` naming both sides.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import Tensor

from autoglm.errors import ConfigError, ModelLoadError
from autoglm.gguf.quants import dequantize
from autoglm.gguf.reader import GGUFFile
from autoglm.kernels import Kernels, bind_kernels, kernels_label
from autoglm.layers.linear import Linear
from autoglm.layers.linear.gguf import GGUFBlockFormat, GGUFLinear, prepare_weights
from autoglm.loader.weights import expected_tensors, fill_parameters
from autoglm.models.config import VisionConfig
from autoglm.models.glm4v import IMAGE_PLACEHOLDER, VisionEncoder
from autoglm.models.glm4v_vision import Glm4vVisionModel
from autoglm.models.loaded import LoadedModel, ModuleInfo
from autoglm.multimodal.image import ImageProcessorConfig

log = logging.getLogger(__name__)

SUPPORTED_PROJECTORS = ("glm4v",)
# GLM-4.1V's published preprocessor_config.json pixel bounds (the mmproj records only mean/std and patch size).
GLM4V_MIN_PIXELS = 12544
GLM4V_MAX_PIXELS = 9633792
_PATCH = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH]  # "v.patch_embd"
_FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


class MmprojVisionEncoder(VisionEncoder):
    """`VisionEncoder` over a stand-alone tower (no Glm4vForConditionalGeneration around it): the GGUF path keeps
    the text decoder and the projector in separate files and modules."""

    def __init__(
        self,
        visual: Glm4vVisionModel,
        *,
        image_token_id: int,
        image_processor: ImageProcessorConfig,
        out_dtype: torch.dtype,
    ) -> None:
        self.visual = visual
        self.placeholder_id = int(image_token_id)
        self.image_processor = image_processor
        self.merge_size = visual.spatial_merge_size
        self._out_dtype = out_dtype

    @property
    def out_dtype(self) -> torch.dtype:
        return self._out_dtype


def _need(f: GGUFFile, key: str) -> Any:
    value = f.get(key)
    if value is None:
        raise ConfigError(f"{f.path}: mmproj metadata has no {key}", param=key)
    return value


def projector_type(f: GGUFFile) -> str:
    """`clip.projector_type` (newer files may spell it `clip.vision.projector_type`)."""
    value = f.get("clip.projector_type", f.get("clip.vision.projector_type"))
    if not isinstance(value, str):
        raise ConfigError(f"{f.path}: mmproj metadata has no clip.projector_type", param="clip.projector_type")
    return value


def open_mmproj(path: str | Path) -> GGUFFile:
    """Open and sanity-check an mmproj GGUF (architecture `clip` with a vision encoder)."""
    f = GGUFFile(path)
    if f.architecture != "clip":
        raise ModelLoadError(
            f"{f.path}: not an mmproj file (general.architecture is {f.architecture!r}, expected 'clip'); "
            "pass the model's projector GGUF to --mmproj",
            param="mmproj",
        )
    if not f.get("clip.has_vision_encoder", False):
        raise ModelLoadError(f"{f.path}: mmproj has no vision encoder (clip.has_vision_encoder is not set)")
    return f


def check_compatible(f: GGUFFile, *, text_hidden_size: int, text_model: str = "glm4 (M-RoPE)") -> None:
    """Projector type and projection size against the text model; errors name both sides."""
    ptype = projector_type(f)
    if ptype not in SUPPORTED_PROJECTORS:
        raise ModelLoadError(
            f"{f.path}: mmproj projector type {ptype!r} cannot be used with the text model {text_model} "
            f"(supported projector types: {', '.join(SUPPORTED_PROJECTORS)})",
            param="mmproj",
        )
    proj = int(_need(f, "clip.vision.projection_dim"))
    if proj != int(text_hidden_size):
        raise ModelLoadError(
            f"{f.path}: mmproj projection size {proj} (clip.vision.projection_dim) does not match the text model's "
            f"embedding size {text_hidden_size}; this projector belongs to another model",
            param="mmproj",
        )


def vision_config(f: GGUFFile) -> VisionConfig:
    """clip.vision.* metadata + tensor shapes -> VisionConfig (what the file does not say is read off shapes)."""
    t = f.tensors
    for name in (f"{_PATCH}.weight", "mm.patch_merger.weight"):
        if name not in t:
            raise ModelLoadError(f"{f.path}: glm4v mmproj has no tensor {name!r}")
    patch = t[f"{_PATCH}.weight"].shape  # [hidden, C, P, P]
    frames = 2 if f"{_PATCH}.weight.1" in t else 1  # the Conv3d's time axis, one kernel per frame
    act = "gelu" if f.get("clip.use_gelu", False) else "silu"
    return VisionConfig(
        depth=int(_need(f, "clip.vision.block_count")),
        hidden_size=int(_need(f, "clip.vision.embedding_length")),
        hidden_act=act,
        attention_bias="v.blk.0.attn_qkv.bias" in t,
        num_heads=int(_need(f, "clip.vision.attention.head_count")),
        in_channels=int(patch[1]),
        image_size=int(_need(f, "clip.vision.image_size")),
        patch_size=int(_need(f, "clip.vision.patch_size")),
        rms_norm_eps=float(f.get("clip.vision.attention.layer_norm_epsilon", 1e-5)),
        spatial_merge_size=int(t["mm.patch_merger.weight"].shape[-1]),
        temporal_patch_size=frames,
        out_hidden_size=int(_need(f, "clip.vision.projection_dim")),
        intermediate_size=int(_need(f, "clip.vision.feed_forward_length")),
    )


def image_processor_config(f: GGUFFile, vc: VisionConfig) -> ImageProcessorConfig:
    mean = f.get("clip.vision.image_mean")
    std = f.get("clip.vision.image_std")
    return ImageProcessorConfig(
        min_pixels=GLM4V_MIN_PIXELS,
        max_pixels=GLM4V_MAX_PIXELS,
        patch_size=vc.patch_size,
        temporal_patch_size=vc.temporal_patch_size,
        merge_size=vc.spatial_merge_size,
        image_mean=tuple(float(x) for x in (mean if mean is not None else ImageProcessorConfig.image_mean)),
        image_std=tuple(float(x) for x in (std if std is not None else ImageProcessorConfig.image_std)),
    )


def _gguf_names(tower: Glm4vVisionModel, depth: int) -> dict[str, str]:
    """Our parameter name (without `visual.`) -> mmproj tensor name, from the gguf package's MMPROJ table."""
    vmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, depth)
    out: dict[str, str] = {}
    for name in expected_tensors(tower):
        if name == "patch_embed.proj.weight":
            continue  # two frame kernels, stacked in `_stream`
        g = vmap.get_name(f"visual.{name}", try_suffixes=(".weight", ".bias"))
        if g is None:
            raise ModelLoadError(f"no mmproj tensor name for vision parameter visual.{name}")
        out[g] = name
    return out


def _keep_quantized(
    tower: Glm4vVisionModel, f: GGUFFile, names: dict[str, str], kernels: Kernels
) -> dict[str, tuple[int, int]]:
    """Swap each tower Linear whose file weight is block-quantized (and runs on `kernels`) for a GGUFLinear of that
    type; -> GGUF name -> raw block shape of the weights now filled with the file's blocks."""
    raw: dict[str, tuple[int, int]] = {}
    for gname, pname in names.items():
        info = f.tensors.get(gname)
        if info is None or info.qtype in _FLOAT_TYPES or not pname.endswith(".weight"):
            continue
        parent, _, _ = pname.rpartition(".")
        mod = tower.get_submodule(parent)
        if not isinstance(mod, Linear):
            continue  # the position table, convolutions: float
        fmt = GGUFBlockFormat(info.qtype, mod.out_features, mod.in_features)
        if kernels.direct_gemv(fmt) is None:
            continue  # no fused kernel for it (the torch reference): float weights are faster
        tower.set_submodule(parent, GGUFLinear.replacing(mod, info.qtype, impl=kernels, name=gname))
        raw[gname] = fmt.raw_shape
    return raw


def _stream(f: GGUFFile, names: dict[str, str], frames: int, raw: dict[str, tuple[int, int]]):  # -> Iterator
    def deq(gname: str) -> Tensor:
        info = f.tensors[gname]
        if gname in raw:  # the file's blocks, a view of the mmap (GGUFLinear.weight)
            return torch.from_numpy(f.raw(info)).view(raw[gname])
        return dequantize(f.raw(info), info.qtype, info.shape, gname)

    kernels = [deq(f"{_PATCH}.weight" + (f".{i}" if i else "")) for i in range(frames)]  # each [D, C, P, P]
    yield "patch_embed.proj.weight", torch.stack(kernels, dim=2)  # Conv3d [D, C, T, P, P]
    for gname in f.tensors:
        if gname.startswith(f"{_PATCH}.weight"):
            continue
        yield names.get(gname, gname), deq(gname)  # an unknown name is reported as a leftover by the fill


def load_mmproj(
    path: str | Path,
    *,
    text_hidden_size: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    image_token_id: int | None = None,
    out_dtype: torch.dtype | None = None,
    kernels: Kernels | None = None,
) -> MmprojVisionEncoder:
    """Read a glm4v mmproj GGUF and build the vision tower as an image encoder: block-quantized linears kept and
    packed for `kernels` (None: everything dequantized), the rest in `dtype`.

    `image_token_id` is the text vocabulary's `<|image|>` id (the placeholder the prompt expands); `out_dtype` the
    decoder's activation dtype (default `dtype`). Raises ModelLoadError on a projector that does not fit."""
    f = open_mmproj(path)
    check_compatible(f, text_hidden_size=text_hidden_size)
    vc = vision_config(f)
    with torch.device("meta"):
        tower = Glm4vVisionModel(vc)
    names = _gguf_names(tower, vc.depth)
    on_cpu = torch.device(device).type == "cpu"
    raw = _keep_quantized(tower, f, names, kernels) if kernels is not None and on_cpu else {}
    fill_parameters(tower, _stream(f, names, vc.temporal_patch_size, raw), source=str(f.path), dtype=dtype,
                    device=device)
    tower.eval()
    prepare_weights(tower)  # the packed layout where the kernels have one (as the runner does for the decoder)
    if kernels is not None and on_cpu:
        bind_kernels(tower, kernels)  # norms, rotary and silu * up: fused float32 loops at 13k-patch sizes
    if image_token_id is None:
        raise ConfigError(f"{f.path}: the text vocabulary has no {IMAGE_PLACEHOLDER} token for image placeholders")
    return MmprojVisionEncoder(
        tower, image_token_id=image_token_id, image_processor=image_processor_config(f, vc),
        out_dtype=out_dtype or dtype,
    )


def attach_mmproj(
    loaded: LoadedModel,
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    kernels: Kernels | None = None,
) -> None:
    """Load `path` as `loaded`'s image encoder (the GGUF loader's `--mmproj` step, `kernels`: the decoder's CPU
    kernels, None to dequantize the tower); adds its ModuleInfo line."""
    t0 = time.perf_counter()
    f = open_mmproj(path)
    cfg = getattr(loaded.decoder, "config", None)
    hidden = int(getattr(loaded.decoder, "hidden_size", 0) or getattr(cfg, "hidden_size", 0))
    text_model = f"{loaded.architecture or 'model'} ({Path(loaded.path).name})"
    if not getattr(loaded.decoder, "uses_mrope", False):
        raise ModelLoadError(
            f"{f.path}: mmproj projector type {projector_type(f)!r} cannot be used with the text model {text_model}: "
            "it has no M-RoPE sections (glm4.rope.dimension_sections), so it is not a GLM-4.1V text model",
            param="mmproj",
        )
    check_compatible(f, text_hidden_size=hidden, text_model=text_model)
    encoder = load_mmproj(
        path, text_hidden_size=hidden, device=device, dtype=torch.float32 if dtype == torch.float16 else dtype,
        image_token_id=loaded.tokenizer.token_to_id(IMAGE_PLACEHOLDER), out_dtype=dtype, kernels=kernels,
    )
    loaded.encoders["image"] = encoder
    loaded.missing_projector = None
    tower = encoder.visual
    kept = [m for m in tower.modules() if isinstance(m, GGUFLinear)]
    n_params = sum(p.numel() for p in tower.parameters()) + sum(m.in_features * m.out_features for m in kept)
    held = sum(p.numel() * p.element_size() for p in tower.parameters()) + sum(m.weight.numel() for m in kept)
    types: dict[str, int] = {}
    for info in f.tensors.values():
        types[info.qtype.name] = types.get(info.qtype.name, 0) + info.nbytes
    dense = str(tower.dtype).removeprefix("torch.")
    if kept:
        kept_types = "/".join(sorted({m.qtype.name for m in kept}))
        label = f"{kept_types} linears kept, the rest {dense}"
    else:
        label = f"{max(types, key=types.__getitem__)} (dequantized to {dense})"
    loaded.modules.append(
        ModuleInfo(
            name="vision",
            path=str(f.path),
            format="gguf",
            quantization=label,
            device=str(encoder.device),
            parameters=n_params,
            bytes=held,
            kernels=kernels_label(kernels) if kept and kernels is not None else "",
            load_seconds=time.perf_counter() - t0,
            bytes_by_type=types,
        )
    )
    log.info("loaded mmproj %s: glm4v projector, %d params on %s", f.path, n_params, encoder.device)


__all__ = ["MmprojVisionEncoder", "attach_mmproj", "check_compatible", "load_mmproj", "vision_config"]
