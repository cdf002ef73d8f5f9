"""Fill a model built on `meta` from a stream of (name, tensor): the one loading path for safetensors and GGUF.

Every parameter (and persistent buffer) is replaced by `assign` — the loaded tensor becomes the parameter, so peak
memory is about the weights once. The load fails, naming the tensors, when any is left over, missing or misshapen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from autoglm.errors import WeightMismatch

_SHOW = 10  # names listed per category in an error message


@dataclass
class FillReport:
    """What a fill did: names filled, names dropped on purpose, seconds spent per group (see `group_of`)."""

    filled: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def expected_tensors(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """name -> (owning module, attribute, is_parameter) for every parameter and persistent buffer, minus tied ones."""
    tied = set(_tied(model))
    out: dict[str, tuple[nn.Module, str, bool]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in mod._parameters.items():
            if p is not None and prefix + attr not in tied:
                out[prefix + attr] = (mod, attr, True)
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set and prefix + attr not in tied:
                out[prefix + attr] = (mod, attr, False)
    return out


def _tied(model: nn.Module) -> dict[str, str]:
    fn = getattr(model, "tied_parameters", None)
    return dict(fn()) if callable(fn) else {}


def _names(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    more = f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return f"{len(names)} {kind}: {shown}{more}"


def fill_parameters(
    model: nn.Module,
    tensors: Iterable[tuple[str, Tensor]],
    *,
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | Callable[[str], torch.device | str] = "cpu",
    drop: Callable[[str], bool] | None = None,
    group_of: Callable[[str], str] | None = None,
    convert: Callable[[str, Tensor], Tensor] | None = None,
    keep_dtype: Callable[[str], bool] | None = None,
) -> FillReport:
    """Assign each (name, tensor) to the model's parameter/buffer of that name.

    dtype:    floating tensors are cast to it (integer/quantized tensors keep theirs); None keeps every dtype.
    device:   a device, or name -> device (per-module placement).
    drop:     names to consume and discard on purpose (e.g. the vision tower with no_vision); not leftovers.
    group_of: name -> group for timing (e.g. "decoder" / "vision").
    convert:  optional hook (name, tensor) -> tensor applied before the shape check (e.g. dequantize).
    keep_dtype: names whose tensors keep the file's dtype despite `dtype` (e.g. quantization scales).
    Raises WeightMismatch naming leftover, missing and misshapen tensors (all of them checked before raising).
    Tied parameters (`model.tied_parameters()`) are re-tied at the end via `model.tie_weights()`.
    """
    expected = expected_tensors(model)
    tied = _tied(model)
    report = FillReport()
    leftovers: list[str] = []
    mismatched: list[str] = []
    seen: set[str] = set()
    place = device if callable(device) else (lambda _n, _d=device: _d)
    t_last = time.perf_counter()
    for name, tensor in tensors:
        group = group_of(name) if group_of is not None else "model"
        if name in tied or (drop is not None and drop(name)):
            report.dropped.append(name)
        elif name not in expected:
            leftovers.append(name)
        elif name in seen:
            leftovers.append(f"{name} (duplicate)")
        else:
            seen.add(name)
            if convert is not None:
                tensor = convert(name, tensor)
            mod, attr, is_param = expected[name]
            current = getattr(mod, attr)
            if tuple(tensor.shape) != tuple(current.shape):
                mismatched.append(f"{name}: file {tuple(tensor.shape)} vs model {tuple(current.shape)}")
            else:
                keep = keep_dtype is not None and keep_dtype(name)
                cast = dtype if dtype is not None and tensor.is_floating_point() and not keep else None
                tensor = tensor.to(device=place(name), dtype=cast)
                if is_param:
                    mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
                else:
                    mod._buffers[attr] = tensor
                report.filled.append(name)
        now = time.perf_counter()
        report.seconds[group] = report.seconds.get(group, 0.0) + (now - t_last)
        t_last = now
    missing = sorted(set(expected) - seen)
    if leftovers or missing or mismatched:
        parts = []
        if leftovers:
            parts.append(_names("unexpected tensor(s) in the file", sorted(leftovers)))
        if missing:
            parts.append(_names("model parameter(s) missing from the file", missing))
        if mismatched:
            parts.append(_names("shape mismatch(es)", mismatched))
        raise WeightMismatch(f"{source}: " + "; ".join(parts))
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    return report
