"""Structured channel pruning of the MLP intermediate dimension (article §2.2), HF checkpoint in, HF checkpoint out.

Criterion (stated, per layer): importance of intermediate channel j =
    mean over calibration tokens of |a_j|  x  ||down_proj[:, j]||_2
where a = act(gate(x)) * up(x) is the input of `down_proj` — the channel's actual contribution to the layer output
(an activation-weighted magnitude, as Wanda scores weights). Without calibration text the data-free fallback is
||down_proj[:, j]|| * ||gate[j, :]|| * ||up[j, :]||. The same number of channels is removed in every layer (HF configs
have one `intermediate_size`), rounded so the kept size stays a multiple of `multiple_of` (int4 groups, kernels).

Works on GLM-4 (fused `gate_up_proj` [2I, D]: gate rows then up rows), GLM-4.1V (text MLPs only; the vision tower is
copied untouched) and Gemma 3 (`gate_proj` / `up_proj` [I, D]); `down_proj` [D, I] loses the same columns.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autoglm.errors import ConfigError, InvalidRequest, ModelLoadError

_MLP = re.compile(
    r"^(?P<stem>.*layers\.(?P<layer>\d+)\.mlp\.)(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj)\.weight$"
)
_VISION = ("visual.", "vision_tower.", "vision_model.")


@dataclass
class PruneReport:
    """What `prune_checkpoint` did."""

    ratio: float
    intermediate_before: int
    intermediate_after: int
    criterion: str
    kept: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept channel indices (sorted)
    parameters_before: int = 0
    parameters_after: int = 0
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    eval_tokens: int = 0
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("kept")
        return d

    def render(self) -> str:
        lines = [f"source: {self.source}"] if self.source else []
        lines += [
            f"criterion: {self.criterion}",
            f"intermediate_size: {self.intermediate_before} -> {self.intermediate_after} per layer "
            f"({len(self.kept)} layers, ratio {self.ratio})",
            f"parameters: {self.parameters_before:,} -> {self.parameters_after:,} "
            f"({100 * (1 - self.parameters_after / max(self.parameters_before, 1)):.1f}% fewer)",
        ]
        if self.perplexity_before is not None and self.perplexity_after is not None:
            lines.append(
                f"perplexity on {self.eval_tokens} held-out tokens: {self.perplexity_before:.3f} -> "
                f"{self.perplexity_after:.3f} ({100 * (self.perplexity_after / self.perplexity_before - 1):+.1f}%)"
            )
        return "\n".join(lines)


def _is_vision(name: str) -> bool:
    return any(v in name for v in _VISION)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def kept_size(intermediate: int, ratio: float, multiple_of: int) -> int:
    """Channels kept per layer: round(I * (1 - ratio)) down to a multiple of `multiple_of` (at least one multiple)."""
    if not 0 <= ratio < 1:
        raise InvalidRequest(f"prune ratio must be in [0, 1), got {ratio}", param="ratio")
    keep = int(round(intermediate * (1 - ratio)))
    if multiple_of > 1 and intermediate % multiple_of == 0:
        keep = max(multiple_of, keep // multiple_of * multiple_of)
    return max(1, min(intermediate, keep))


def _mlp_of(model: nn.Module) -> dict[int, nn.Module]:
    """layer index -> the text MLP module (has `down_proj`)."""
    out: dict[int, nn.Module] = {}
    for name, mod in model.named_modules():
        m = re.search(r"layers\.(\d+)\.mlp$", name)
        if m and not _is_vision(name) and hasattr(mod, "down_proj"):
            out[int(m.group(1))] = mod
    return out


def _row_norms(mlp: nn.Module, inter: int) -> Tensor:
    """||gate[j]|| * ||up[j]|| for each intermediate channel (GLM fused or Gemma split projections)."""
    if hasattr(mlp, "gate_up_proj"):
        w = mlp.gate_up_proj.weight.float()  # [2I, D]
        return w[:inter].norm(dim=1) * w[inter:].norm(dim=1)
    return mlp.gate_proj.weight.float().norm(dim=1) * mlp.up_proj.weight.float().norm(dim=1)


@torch.inference_mode()
def channel_importance(model: nn.Module, calibration: list[Tensor] | None, inter: int) -> dict[int, Tensor]:
    """layer -> importance [I] (see the module docstring); `calibration`: token id sequences, or None (data-free)."""
    mlps = _mlp_of(model)
    col_norm = {i: m.down_proj.weight.float().norm(dim=0) for i, m in mlps.items()}  # [I]
    if not calibration:
        return {i: col_norm[i] * _row_norms(m, inter) for i, m in mlps.items()}
    sums = {i: torch.zeros(inter) for i in mlps}
    count = 0
    hooks = []
    for i, m in mlps.items():

        def hook(_mod: nn.Module, args: tuple[Tensor, ...], i: int = i) -> None:
            sums[i] += args[0].reshape(-1, inter).float().abs().sum(dim=0)  # a: [T, I]

        hooks.append(m.down_proj.register_forward_pre_hook(hook))
    try:
        for ids in calibration:
            _forward_logits(model, ids)
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return {i: sums[i] / max(count, 1) * col_norm[i] for i in mlps}


def _forward_logits(model: nn.Module, ids: Tensor) -> Tensor:
    from autoglm.layers.attention import AttentionContext

    t = ids.numel()
    positions = torch.arange(t)
    if getattr(model, "uses_mrope", False):
        positions = positions.expand(3, t)
    hidden = model(ids, positions, AttentionContext.no_cache([t]))
    return model.compute_logits(hidden)


@torch.inference_mode()
def perplexity(model: nn.Module, sequences: list[Tensor]) -> tuple[float, int]:
    """exp(mean next-token NLL) over the sequences; returns (perplexity, tokens scored)."""
    nll, n = 0.0, 0
    for ids in sequences:
        if ids.numel() < 2:
            continue
        logits = _forward_logits(model, ids)[:-1]  # [T-1, V]
        nll += torch.nn.functional.cross_entropy(logits.float(), ids[1:], reduction="sum").item()
        n += ids.numel() - 1
    if n == 0:
        raise InvalidRequest("perplexity needs at least one sequence of 2+ tokens")
    return math.exp(nll / n), n


def split_text(ids: list[int], window: int) -> list[Tensor]:
    return [torch.tensor(ids[s : s + window]) for s in range(0, len(ids), window) if len(ids[s : s + window]) > 1]


def prune_checkpoint(
    src: str | Path,
    dst: str | Path,
    ratio: float,
    *,
    calibration_text: str | list[int] | None = None,
    eval_text: str | list[int] | None = None,
    window: int = 256,
    multiple_of: int = 32,
    measure: bool = True,
) -> PruneReport:
    """Prune `src` (HF dir, or a GGUF file) into `dst` (HF dir). Calibration text (or token ids) picks channels;
    `eval_text` (held out; text or ids) measures perplexity before and after — after by loading `dst` back, so the
    written checkpoint is what is measured. Texts need the checkpoint's tokenizer; without one they are ignored.
    A GGUF file is first exported to a float32 HF directory beside `dst` (removed afterwards) with the GGUF loader's
    conventions (`autoglm.gguf.export`), so "before" is the dequantized GGUF model."""
    from autoglm.gguf.export import export_hf, is_gguf_file
    from autoglm.loader.hf import iter_safetensors, load_hf, safetensors_files
    from autoglm.tools.quantize import ShardedWriter, copy_side_files

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise InvalidRequest("prune output must be a new directory, not the input", param="output")
    kwargs: dict[str, Any] = dict(
        calibration_text=calibration_text, eval_text=eval_text, window=window, multiple_of=multiple_of, measure=measure
    )
    if is_gguf_file(src):
        import tempfile

        dst.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".prune-src-", dir=dst.parent) as tmp:
            report = prune_checkpoint(export_hf(src, Path(tmp) / "float32"), dst, ratio, **kwargs)
        report.source = f"{src} (GGUF, dequantized to float32)"
        return report
    if not (src / "config.json").is_file():
        raise ModelLoadError(f"{src}: neither an HF model directory (config.json) nor a GGUF file", param="model")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config") is not None:
        raise ConfigError(f"{src}: prune a float checkpoint, then quantize (this one is already quantized)")
    text_cfg = _text_config(config)
    inter = int(text_cfg["intermediate_size"])
    keep = kept_size(inter, ratio, multiple_of)

    loaded = load_hf(src, dtype="float32", no_vision=True)
    model = loaded.decoder
    tok = loaded.tokenizer

    def ids_of(text: str | list[int] | None) -> list[Tensor] | None:
        if not text or (isinstance(text, str) and tok is None):
            return None
        return split_text(tok.encode(text) if isinstance(text, str) else list(text), window)

    calib, evals = ids_of(calibration_text), ids_of(eval_text)
    criterion = (
        "mean |down_proj input| x ||down_proj column|| on calibration text"
        if calib
        else "||down_proj column|| x ||gate row|| x ||up row|| (data-free)"
    )
    report = PruneReport(
        ratio=ratio, intermediate_before=inter, intermediate_after=keep, criterion=criterion, source=str(src)
    )
    scores = channel_importance(model, calib, inter)
    for layer, s in scores.items():
        report.kept[layer] = sorted(torch.topk(s, keep).indices.tolist())
    if measure and evals:
        report.perplexity_before, report.eval_tokens = perplexity(model, evals)
    del model, loaded

    dst.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(dst)
    for key, tensor in iter_safetensors(safetensors_files(src)):
        report.parameters_before += tensor.numel()
        m = _MLP.search(key)
        if m and not _is_vision(key):
            idx = torch.tensor(report.kept[int(m.group("layer"))])
            proj = m.group("proj")
            if proj == "gate_up_proj":  # [2I, D]: gate rows then up rows
                tensor = torch.cat([tensor[:inter][idx], tensor[inter:][idx]])
            elif proj == "down_proj":  # [D, I]
                tensor = tensor[:, idx]
            else:
                tensor = tensor[idx]
        writer.add(key, tensor)
        report.parameters_after += tensor.numel()
    writer.close()
    new_config = json.loads(json.dumps(config))
    _text_config(new_config)["intermediate_size"] = keep
    (dst / "config.json").write_text(json.dumps(new_config, indent=2), encoding="utf-8")
    copy_side_files(src, dst)
    if measure and evals:
        pruned = load_hf(dst, dtype="float32", no_vision=True).decoder
        report.perplexity_after, _ = perplexity(pruned, evals)
    return report


# Calibration / evaluation sample used when no text file is given (written for this project; plain prose about
# phones and apps, the domain AutoGLM-Phone works in). The CLI scores on the first half, measures on the second.
SAMPLE_TEXT = (
    "A phone assistant reads the screen the way a person does. It looks at the status bar, the title of the "
    "current app, the buttons along the bottom and the list in the middle, and it decides what to tap next. "
    "When the user asks it to order a coffee, it opens the delivery app, searches for the nearest cafe, picks "
    "a medium latte with oat milk, checks the address and the price, and asks before it pays. When a pop-up "
    "appears, it reads the text first: a permission request, an advertisement, a warning that the battery is "
    "low. It closes what is not needed and remembers what the user said about notifications. Small models make "
    "this possible on the device itself, without sending every screenshot to a server. The weights must fit in "
    "the memory that is left after the system and the other apps, and each step must be quick enough that the "
    "user does not wait. Quantization stores each weight in eight or four bits instead of sixteen; pruning "
    "removes the channels that contribute least; careful kernels read each byte of the model once per token.\n"
    "In the evening the same assistant sets an alarm for half past six, turns on do-not-disturb, and writes a "
    "short message to a friend: the train was late, dinner is moved to eight o'clock, the restaurant is the one "
    "near the river. It opens the calendar and moves the meeting from Tuesday to Thursday, then finds the "
    "photo from last weekend and shares it in the family group. Some tasks need several apps in a row: copy a "
    "tracking number from an email, paste it into the courier's page, and report when the parcel will arrive. "
    "Each screen is a new picture, and each decision is a few words of reasoning followed by one action, such "
    "as a tap at a point, a swipe, typing text, or going back. When something unexpected happens, for example "
    "a login page or a captcha, the assistant stops and hands control to the user instead of guessing.\n"
)
