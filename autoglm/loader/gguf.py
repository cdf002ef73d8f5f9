"""Load a GGUF model (llama.cpp format): metadata -> config, tokenizer, chat template; tensors -> weights.

Quantized weights stay quantized: every linear/embedding whose tensor is not F32 becomes a `GGUFLinear` /
`GGUFEmbedding` holding the file's blocks as a view of the mmap (no float copy of the model); norms and biases are
float32. Every tensor of the file must land in a parameter, and every parameter must come from the file.
This module knows no architecture: `autoglm.models.registry.gguf_module(general.architecture)` builds the decoder
from the metadata and says how to undo the converter's layout changes; a `glm4v` mmproj adds the vision tower
(see `autoglm.gguf.mmproj`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import Tensor, nn

from autoglm.errors import ConfigError, ModelLoadError, UnsupportedQuantType
from autoglm.gguf.names import gguf_names_for
from autoglm.gguf.reader import GGUFFile, TensorInfo
from autoglm.gguf.tokenizer import build_chat_template, build_tokenizer, eos_token_ids
from autoglm.kernels import REFERENCE, Kernels, bind_kernels, kernels_label, select_kernels
from autoglm.layers.linear import Linear
from autoglm.loader.device import accelerator_dtype, dense_gguf
from autoglm.loader.hf import resolve_devices
from autoglm.loader.weights import expected_tensors, fill_parameters
from autoglm.models.loaded import LoadedModel, ModuleInfo
from autoglm.models.registry import gguf_module

log = logging.getLogger("autoglm.loader.gguf")

Q = gguf.GGMLQuantizationType
MISSING_MMPROJ = "Missing mmproj file for vision encoder projection"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DENSE = {Q.F32}  # kept as plain float tensors; everything else stays in its block format


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return torch.float32  # GGUF weights are decoded to float32 activations on CPU
    if name not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; supported: auto, {', '.join(_DTYPES)}", param="dtype")
    return _DTYPES[name]


def _need(f: GGUFFile, key: str) -> Any:
    v = f.get(key)
    if v is None:
        raise ConfigError(f"{f.path}: GGUF metadata has no {key!r}", param=key)
    return v


def build_decoder(f: GGUFFile) -> nn.Module:
    """The text decoder for the file's architecture (its module, from the registry), built on `meta` (not filled)."""
    module = gguf_module(f.architecture, source=str(f.path))
    with torch.device("meta"):
        return module.from_gguf(f)


def layout_fixups(f: GGUFFile, model: nn.Module) -> Callable[[str, Tensor], Tensor]:
    """(our name, tensor) -> tensor undoing the converter's layout changes (the architecture module says which)."""
    return gguf_module(f.architecture, source=str(f.path)).gguf_fixups(model)


# --- weights ---------------------------------------------------------------------------------------------------
def _check_supported(info: TensorInfo, path: Path) -> None:
    from autoglm.gguf.quants import SUPPORTED_TYPES

    if info.qtype not in SUPPORTED_TYPES:
        raise UnsupportedQuantType(
            f"{path}: tensor {info.name!r} has type {info.qtype.name}, which autoglm does not support "
            f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})",
            param=info.name,
        )


def _dense(f: GGUFFile, info: TensorInfo) -> Tensor:
    """A float32 tensor of `info` (a zero-copy view for F32; decoded for the rest)."""
    raw = torch.from_numpy(f.raw(info))
    if info.qtype == Q.F32:
        return raw.view(torch.float32).view(info.shape)
    from autoglm.gguf.quants import dequantize

    return dequantize(raw, info.qtype, info.shape, info.name)


def _swap_quantized(
    model: nn.Module, f: GGUFFile, names: dict[str, str], dtype: torch.dtype, kernels: Kernels = REFERENCE
) -> None:
    """Replace each Linear / Embedding whose file weight is block-quantized (or F16/BF16) by its GGUF module, computing
    with `kernels`."""
    from autoglm.layers.linear.gguf import GGUFEmbedding, GGUFLinear

    for gname, pname in names.items():
        info = f.tensors.get(gname)
        if info is None or info.qtype in _DENSE or not pname.endswith(".weight"):
            continue
        parent_name, _, attr = pname.rpartition(".")
        mod = model.get_submodule(parent_name)
        if isinstance(mod, Linear | nn.Linear):
            new: nn.Module = GGUFLinear.replacing(mod, info.qtype, impl=kernels, name=gname)
        elif isinstance(mod, nn.Embedding):
            with torch.device("meta"):
                new = GGUFEmbedding(
                    mod.num_embeddings, mod.embedding_dim, info.qtype, impl=kernels, dtype=dtype, name=gname
                )
        else:
            continue  # a quantized norm or other 1-D tensor: decoded to float in the stream
        model.set_submodule(parent_name, new)


def load_gguf(
    path: str | Path,
    *,
    mmproj: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | dict[str, Any] = "cpu",
    no_vision: bool = False,
    dequantize: bool | None = None,
    cpu_isa: str | None = None,
) -> LoadedModel:
    """Load a llama.cpp GGUF file (plus an optional `mmproj` vision projector GGUF) as a LoadedModel.
    `dequantize`: decode the block-quantized weights once into dense ones (None: on CUDA only; loader/device.py).
    `cpu_isa`: the CPU kernel variant of the decoder (`select_kernels`; None: `$AUTOGLM_CPU_ISA`, else the best)."""
    t0 = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    f = GGUFFile(path)
    act_dtype = _resolve_dtype(dtype)
    devices = resolve_devices(device, ("decoder", "vision"))  # vision: the mmproj's tower, when one is given
    if str(dtype).removeprefix("torch.") == "auto":
        act_dtype = accelerator_dtype(devices["decoder"]) or act_dtype
    dense = dense_gguf(devices["decoder"], dequantize)
    arch = f.architecture
    for info in f.tensors.values():
        _check_supported(info, path)
    _check_block_count(f, arch)  # before building: a claimed 10**9 layers would hang while making modules
    model = build_decoder(f)
    n_blocks = int(_need(f, f"{arch}.block_count"))
    names = gguf_names_for(arch, n_blocks, expected_tensors(model))
    kernels = select_kernels(devices["decoder"], cpu_isa)  # once for this model: CPU kernels when built, else torch
    if not dense:  # else every weight stays an ordinary Linear / Embedding, filled dequantized by the stream
        _swap_quantized(model, f, names, act_dtype, kernels)
        tied = getattr(model, "tied_parameters", None)
        if callable(tied) and tied() and "token_embd.weight" in f.tensors:
            _swap_tied_head(model, f.tensors["token_embd.weight"], kernels)
    convert = layout_fixups(f, model)

    def stream() -> Iterator[tuple[str, Tensor]]:
        for gname, info in f.tensors.items():
            pname = names.get(gname, gname)  # unmapped: reported under its GGUF name as a leftover
            mod_name = pname.rpartition(".")[0]
            try:
                mod = model.get_submodule(mod_name)
            except AttributeError:
                mod = None
            if mod is not None and hasattr(mod, "weight_format") and pname.endswith(".weight"):
                raw = torch.from_numpy(f.raw(info)).view(mod.weight_format.raw_shape)  # type: ignore[union-attr]
                yield pname, convert(pname, raw)
            else:
                t = convert(pname, _dense(f, info))
                is_linear_weight = isinstance(mod, Linear | nn.Linear | nn.Embedding) and pname.endswith(".weight")
                # dense (CUDA): every tensor in the activation dtype, as an HF checkpoint loads (no float32 norm
                # weight promoting bf16 hidden states in front of a bf16 matmul)
                yield pname, t.to(act_dtype) if is_linear_weight or dense else t.float()

    fill_parameters(model, stream(), source=str(path), device=devices["decoder"])
    model.eval()
    seconds = time.perf_counter() - t0
    tokenizer = build_tokenizer(f.metadata, source=str(path))
    template = build_chat_template(f.metadata, tokenizer, source=str(path))
    info = _module_info("decoder", f, seconds, str(devices["decoder"]))
    info.kernels = kernels_label(kernels)
    loaded = LoadedModel(
        decoder=model,
        tokenizer=tokenizer,
        chat_template=template,
        generation_defaults=_sampling_defaults(f),
        eos_token_ids=eos_token_ids(f.metadata),
        name=path.stem,
        path=str(path),
        architecture=arch,
        max_model_len=int(f.get(f"{arch}.context_length", 4096)),
        modules=[info],
    )
    _attach_vision(loaded, f, mmproj, no_vision=no_vision, dtype=act_dtype, device=devices["vision"],
                   kernels=None if dense else kernels)  # fmt: skip
    log.info(
        "loaded %s: %s %s, %d tensors, %.1f MiB in %.2fs",
        path,
        arch,
        info.quantization,
        len(f.tensors),
        info.bytes / 2**20,
        seconds,
    )
    # the decoder's norms, rotary and attention run with the same kernels (the mmproj tower binds its own);
    # packing weights is the explicit `prepare_weights` step (server start-up / engine runner), not part of loading
    bind_kernels(loaded.decoder, kernels)
    log.info("%s: %s kernels%s", path.name, info.kernels, f", weights dequantized to {act_dtype}" if dense else "")
    return loaded


def _check_block_count(f: GGUFFile, arch: str) -> None:
    """`{arch}.block_count` must name the layers the file holds (`blk.N.*` tensors for N below it)."""
    key = f"{arch}.block_count"
    claimed = f.metadata.get(key)
    if claimed is None:
        return  # build_decoder names the missing key
    try:
        n = int(claimed)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{f.path}: {key} is {claimed!r}, not a layer count") from None
    held = {int(name.split(".")[1]) for name in f.tensors if name.startswith("blk.") and name.split(".")[1].isdigit()}
    if n < 1 or n > len(held):
        raise ModelLoadError(f"{f.path}: {key} is {n}, but the file holds tensors for {len(held)} layer(s) "
                             f"(blk.0 .. blk.{max(held) if held else -1})")


def dense_weights(f: GGUFFile) -> Iterator[tuple[str, Tensor]]:
    """(our parameter name, float32 tensor) for every tensor of `f`, decoded from its block type with the
    converter's layout changes undone (Gemma norms - 1, GLM-4.1V q/k order): the values `load_gguf` computes with.
    For exporting a GGUF as an HF checkpoint (`autoglm.gguf.export`); a tensor with no parameter raises."""
    for info in f.tensors.values():
        _check_supported(info, f.path)
    model = build_decoder(f)  # on meta: only its names and config are used
    arch = f.architecture
    names = gguf_names_for(arch, int(_need(f, f"{arch}.block_count")), expected_tensors(model))
    convert = layout_fixups(f, model)
    for gname, info in f.tensors.items():
        pname = names.get(gname)
        if pname is None:
            raise ModelLoadError(f"{f.path}: tensor {gname!r} has no parameter in the {arch} model", param=gname)
        yield pname, convert(pname, _dense(f, info)).float()


def _swap_tied_head(model: nn.Module, embd: TensorInfo, kernels: Kernels = REFERENCE) -> None:
    """A tied lm_head over a quantized embedding must read the same blocks: make it a GGUFLinear of that type."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, Linear | nn.Linear) or embd.qtype in _DENSE:
        return
    from autoglm.layers.linear.gguf import GGUFLinear

    with torch.device("meta"):
        model.lm_head = GGUFLinear(
            head.in_features, head.out_features, embd.qtype, impl=kernels, name="output.weight (tied)"
        )


def _sampling_defaults(f: GGUFFile) -> dict[str, Any]:
    """`general.sampling.*` (newer llama.cpp converters copy generation_config.json there)."""
    keys = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p"}
    out: dict[str, Any] = {}
    for k, ours in keys.items():
        v = f.get(f"general.sampling.{k}")
        if v is not None:
            out[ours] = int(v) if ours == "top_k" else float(v)
    penalty = f.get("general.sampling.penalty_repeat")
    if penalty is not None:
        out["repetition_penalty"] = float(penalty)
    return out


def file_quantization(f: GGUFFile) -> str:
    """`general.file_type` as llama.cpp names it (Q4_K_M, F16, ...), else the dominant tensor type."""
    ft = f.get("general.file_type")
    if ft is not None:
        try:
            return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    by_type = bytes_by_type(f)
    return max(by_type, key=by_type.__getitem__) if by_type else "unknown"


def bytes_by_type(f: GGUFFile) -> dict[str, int]:
    out: dict[str, int] = {}
    for info in f.tensors.values():
        out[info.qtype.name] = out.get(info.qtype.name, 0) + info.nbytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _module_info(name: str, f: GGUFFile, seconds: float, device: str) -> ModuleInfo:
    return ModuleInfo(
        name=name,
        path=str(f.path),
        format="gguf",
        quantization=file_quantization(f),
        device=device,
        parameters=sum(i.n_elements for i in f.tensors.values()),
        bytes=sum(i.nbytes for i in f.tensors.values()),
        load_seconds=seconds,
        bytes_by_type=bytes_by_type(f),
    )


def _has_vision(f: GGUFFile) -> bool:
    """The text model was converted from a vision-language checkpoint (GLM-4.1V: M-RoPE sections)."""
    sections = f.get(f"{f.architecture}.rope.dimension_sections")
    return sections is not None and any(int(x) for x in sections)


def _attach_vision(
    loaded: LoadedModel,
    f: GGUFFile,
    mmproj: str | Path | None,
    *,
    no_vision: bool,
    dtype: torch.dtype,
    device: torch.device,
    kernels: Kernels | None = None,
) -> None:
    if mmproj is None:
        if _has_vision(f) and not no_vision:
            loaded.missing_projector = (
                f"{MISSING_MMPROJ}: {f.path.name} is a vision-language model but was loaded without its projector; "
                "images need the matching mmproj GGUF: start with `autoglm serve -m MODEL.gguf --mmproj "
                "mmproj-MODEL.gguf` (or `autoglm.LLM(path, mmproj=...)`)"
            )
            log.warning("%s", loaded.missing_projector)
        return
    if no_vision:
        log.info("no_vision: not loading the projector %s", mmproj)
        return
    from autoglm.gguf.mmproj import attach_mmproj

    attach_mmproj(loaded, Path(mmproj), dtype=dtype, device=device, kernels=kernels)
