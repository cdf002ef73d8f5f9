"""Load a Hugging Face model directory (config.json + safetensors, single or sharded) into a `LoadedModel`.

The model is built on `meta` and every parameter is assigned a tensor read from the mmap'd safetensors files, so
peak memory is about the weights once. No transformers import; no pickle.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from autoglm.errors import ConfigError, CorruptFile, ModelLoadError
from autoglm.loader.device import accelerator_dtype, check_device
from autoglm.loader.weights import fill_parameters
from autoglm.models.config import checkpoint_facts, read_config_json
from autoglm.models.loaded import LoadedModel, ModuleInfo
from autoglm.models.registry import ModelSpec, hf_spec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# generation_config.json keys that become request defaults (as vLLM applies them)
_GEN_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "do_sample")


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: str | None) -> torch.dtype:
    """ "auto" -> the checkpoint's torch_dtype/dtype (float32 when absent); else a named float dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"unsupported dtype {dtype}; supported: auto, {', '.join(_DTYPES)}", param="dtype")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return _DTYPES.get(checkpoint_dtype or "float32", torch.float32)
    if name not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; supported: auto, {', '.join(_DTYPES)}", param="dtype")
    return _DTYPES[name]


def resolve_devices(
    device: str | torch.device | dict[str, Any], modules: Sequence[str] = ("decoder",)
) -> dict[str, torch.device]:
    """A device, or {module name: device} over the modules the model declares (`decoder`, `vision`, ...) -> one
    device per module; a module the dict leaves out takes the decoder's device."""
    names = list(dict.fromkeys(["decoder", *modules]))
    if isinstance(device, dict):
        unknown = set(device) - set(names)
        if unknown:
            raise ConfigError(f"unknown module(s) in device map: {sorted(unknown)}; this model has: {', '.join(names)}")
        dec = check_device(device.get("decoder", "cpu"))
        return {n: check_device(device.get(n, dec), f"device[{n!r}]") for n in names}
    d = check_device(device)
    return {n: d for n in names}


def safetensors_files(root: Path) -> list[Path]:
    """The checkpoint's safetensors files: from model.safetensors.index.json when present, else all *.safetensors."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptFile(f"{index}: invalid safetensors index ({e})") from e
        files = [root / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index} names shard {f.name}, which does not exist")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        if any(root.glob("*.bin")) or any(root.glob("*.pt")):
            raise ModelLoadError(f"{root}: only pickle weights (*.bin/*.pt) found; we load safetensors only")
        raise ModelLoadError(f"{root}: no *.safetensors weight files")
    return files


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _check_layer_count(config: dict[str, Any], files: list[Path], root: Path) -> None:
    """config's num_hidden_layers must not exceed the layers the safetensors hold (`...layers.N.` tensor names)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    claimed = text.get("num_hidden_layers", config.get("num_hidden_layers"))
    if not isinstance(claimed, int) or isinstance(claimed, bool):
        return  # the model's own config parsing names a missing or mistyped value
    held: set[int] = set()
    for f in files:
        try:
            size = f.stat().st_size
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n <= size - 8:
                    return  # a corrupt header: the weight reader names it
                keys = json.loads(fh.read(n))
        except (OSError, ValueError):
            return
        if isinstance(keys, dict):
            held.update(int(m.group(1)) for k in keys if (m := _LAYER_KEY.search(k)))
    if held and claimed > len(held):
        raise ConfigError(f"{root / 'config.json'}: num_hidden_layers is {claimed}, but the weights hold "
                          f"{len(held)} layer(s)", param="num_hidden_layers")


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _header(f: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file already validated by safe_open."""
    with f.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 8 + n, json.loads(fh.read(n))


def _read_converted(fh: Any, start: int, entry: dict[str, Any], dtype: torch.dtype) -> Tensor:
    """Read one tensor with a plain read and cast it: the transient copy is freed at once, where mmap'd pages
    would stay resident until the file closes (peak memory = converted weights + one tensor)."""
    a, b = entry["data_offsets"]
    raw = torch.empty(b - a, dtype=torch.uint8)
    fh.seek(start + a)
    if fh.readinto(memoryview(raw.numpy())) != b - a:
        raise SafetensorError("tensor data shorter than its header says")
    return raw.view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"]).to(dtype)


def iter_safetensors(
    files: list[Path], dtype: torch.dtype | None = None, *, keep_dtype: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield (checkpoint name, tensor) from each file; CorruptFile names the file on a bad header or data.

    Tensors already in `dtype` (or all, when dtype is None; and every non-float one; and those `keep_dtype(name)`
    selects, e.g. quantization scales) come zero-copy from the mmap; floating tensors in another dtype are read and
    cast one at a time.
    """
    keep = keep_dtype or (lambda _k: False)
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                keys = list(st.keys())
                convert = dtype is not None and any(
                    _ST_DTYPES.get(st.get_slice(k).get_dtype(), dtype).is_floating_point
                    and _ST_DTYPES.get(st.get_slice(k).get_dtype()) != dtype
                    and not keep(k)
                    for k in keys
                )
                if not convert:
                    for key in keys:
                        yield key, st.get_tensor(key)
                    continue
                start, header = _header(f)
                with f.open("rb") as fh:
                    for key in keys:
                        entry = header[key]
                        src = _ST_DTYPES.get(entry["dtype"])
                        if src is None or not src.is_floating_point or src == dtype or keep(key):
                            yield key, st.get_tensor(key)
                        else:
                            assert dtype is not None
                            yield key, _read_converted(fh, start, entry, dtype)
        except SafetensorError as e:
            raise CorruptFile(f"{f}: corrupt or truncated safetensors file ({e})") from e


def read_generation_config(root: Path) -> dict[str, Any]:
    f = root / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: invalid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _load_tokenizer(root: Path) -> tuple[Any, Any]:
    """(Tokenizer, ChatTemplate | None) from the directory's tokenizer files."""
    from autoglm.tokenizer.chat_template import ChatTemplate, NoChatTemplate
    from autoglm.tokenizer.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_hf_dir(root)
    try:
        return tokenizer, ChatTemplate.from_hf_dir(root)
    except NoChatTemplate:  # a base model: raw prompts work, chat requests get a clear error
        log.warning("%s has no chat template; only raw-prompt completion is available", root)
        return tokenizer, None


def _module_info(
    model: nn.Module, spec: ModelSpec, name: str, root: Path, device: torch.device, seconds: float
) -> ModuleInfo | None:
    params = [
        (n, p)
        for n, p in model.named_parameters()
        if (spec.vision_prefix is not None and n.startswith(spec.vision_prefix)) == (name == "vision")
    ]
    if not params:
        return None
    by_type: dict[str, int] = {}
    for _, p in params:
        t = str(p.dtype).removeprefix("torch.")
        by_type[t] = by_type.get(t, 0) + p.numel() * p.element_size()
    dtypes = sorted(by_type, key=lambda t: -by_type[t])
    return ModuleInfo(
        name=name,
        path=str(root),
        format="safetensors",
        quantization=dtypes[0],
        device=str(device),
        parameters=sum(p.numel() for _, p in params),
        bytes=sum(by_type.values()),
        load_seconds=seconds,
        bytes_by_type=by_type,
    )


def _quantization_aux(model: nn.Module) -> set[str]:
    """Our names of the quantized layers' non-bias floating tensors (int8 `scales`, int4 `scales_and_zeros`)."""
    out: set[str] = set()
    for mod_name, mod in model.named_modules():
        if getattr(mod, "format", None) in ("int8", "int4"):
            params = mod.named_parameters(recurse=False)
            out |= {f"{mod_name}.{n}" for n, p in params if n != "bias" and p.is_floating_point()}
    return out


def load_hf(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | dict[str, Any] = "cpu",
    no_vision: bool = False,
    quantization: str | None = None,
) -> LoadedModel:
    """Load an HF model directory. dtype: "auto" | "float32" | "bfloat16" | "float16"; device: a device or
    {"decoder": ..., "vision": ...}; no_vision skips the vision tower (its tensors are read past, not loaded);
    quantization "int8" | "int4" quantizes the decoder's linear layers after loading (a checkpoint that records a
    `quantization_config` is loaded quantized as recorded)."""
    from autoglm.quant.apply import apply_quantization, finalize_quantization, quantization_from_config

    t0 = time.perf_counter()
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"{root}: not a model directory")
    config = read_config_json(root)
    spec = hf_spec(config, source=str(root / "config.json"))
    try:
        ckpt_dtype, config_eos, max_len = checkpoint_facts(config)
    except ConfigError as e:  # name the file; the message already names the key
        raise ConfigError(f"{root / 'config.json'}: {e.message}", param=e.param) from e
    devices = resolve_devices(device, spec.modules)
    torch_dtype = resolve_dtype(dtype, ckpt_dtype)
    if str(dtype).removeprefix("torch.") == "auto":  # on CUDA: the checkpoint's 16-bit dtype, else bfloat16
        torch_dtype = accelerator_dtype(devices["decoder"], torch_dtype) or torch_dtype
    files = safetensors_files(root)
    _check_layer_count(config, files, root)  # before building: a claimed 10**6 layers would hang making modules

    try:
        with torch.device("meta"):
            model = spec.build(config, no_vision)
    except ConfigError as e:
        raise ConfigError(f"{root / 'config.json'}: {e.message}", param=e.param) from e

    vp = spec.vision_prefix
    recorded = quantization_from_config(config, source=str(root / "config.json"))
    if recorded is not None:  # pre-quantized checkpoint: quantized shells are filled by name
        apply_quantization(model, recorded)

    def is_vision(name: str) -> bool:
        return vp is not None and name.startswith(vp)

    # quantized layers' scales/zeros keep the dtype they were written in (int8 scales float32, int4 bfloat16)
    aux = _quantization_aux(model) if recorded is not None else set()

    def keep_dtype(key: str) -> bool:
        ours = spec.rename(key)
        return ours is not None and ours in aux

    def renamed() -> Iterator[tuple[str, Tensor]]:
        for key, tensor in iter_safetensors(files, torch_dtype, keep_dtype=keep_dtype if aux else None):
            ours = spec.rename(key)
            if ours is not None:
                yield ours, tensor

    report = fill_parameters(
        model,
        renamed(),
        source=str(root),
        dtype=torch_dtype,
        device=lambda n: devices["vision"] if is_vision(n) else devices["decoder"],
        drop=(lambda n: is_vision(n)) if no_vision else None,
        group_of=lambda n: "vision" if is_vision(n) else "decoder",
        keep_dtype=(lambda n: n in aux) if aux else None,
    )
    if quantization not in (None, "none") and recorded is None:
        # Float checkpoint quantized on load, layer by layer: peak memory is the float weights (say so in docs).
        apply_quantization(model, quantization, vision_prefix=vp)
    if recorded is not None or quantization not in (None, "none"):
        finalize_quantization(model)
    model.eval()

    tokenizer, chat_template = _load_tokenizer(root)
    gen = read_generation_config(root)
    eos = _as_ids(gen.get("eos_token_id")) or config_eos
    defaults = {k: gen[k] for k in _GEN_KEYS if k in gen}

    modules = [
        info
        for name in spec.modules
        if (info := _module_info(model, spec, name, root, devices[name], report.seconds.get(name, 0.0))) is not None
    ]
    encoders: dict[str, Any] = {}
    if spec.encoders is not None and not no_vision:
        encoders = spec.encoders(model, root)
    if modules:
        # the decoder row also carries the time outside the tensor loop (config, build, tokenizer)
        modules[0].load_seconds += (time.perf_counter() - t0) - sum(report.seconds.values())
    for info in modules:
        log.info(
            "loaded %s from %s: %s, %s on %s, %d parameters, %d bytes, %.2fs",
            info.name,
            info.path,
            info.format,
            info.quantization,
            info.device,
            info.parameters,
            info.bytes,
            info.load_seconds,
        )
    return LoadedModel(
        decoder=model,
        tokenizer=tokenizer,
        chat_template=chat_template,
        encoders=encoders,
        generation_defaults=defaults,
        eos_token_ids=eos,
        name=root.resolve().name,
        path=str(root),
        architecture=spec.architecture,
        max_model_len=int(getattr(model, "max_position_embeddings", max_len)),
        modules=modules,
    )
