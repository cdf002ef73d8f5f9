"""`autoglm quantize IN OUT TYPE`: quantize a model; what IN is (never its name) picks the mode.

- IN is a GGUF file (GGUF magic): re-quantize its weights to TYPE (f32 ... q4_k_m), copying all its metadata.
  Every quantizable 2-D weight (llama.cpp's rule: names ending in `weight`, not norms) is decoded and re-encoded
  (q4_k_m uses llama.cpp's mixture: Q6_K for output and some attn_v / ffn_down); norms, biases and other 1-D
  tensors are stored F32. Tensors are streamed one at a time, so memory stays at about one tensor.
- IN is an HF model directory (config.json): write OUT as an HF directory with weight-only INT8 (per output
  channel) or INT4 (group-wise, --group-size) linear layers of the text decoder, recorded in config.json's
  `quantization_config`; `autoglm serve OUT` / `autoglm.LLM(OUT)` load it quantized, with peak memory about the
  quantized weights. The vision tower and a tied lm_head stay in their dtype; with int4 the lm_head is int8.
- IN is an HF speech directory (config.json architectures: ParakeetForCTC) and TYPE is int8: export the CTC
  Conformer to ONNX (NeMo signature + metadata) as OUT.onnx and its INT8 dynamic quantization as OUT.int8.onnx.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoglm.errors import AutoGLMError, CorruptFile, InvalidRequest, UnsupportedQuantType

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

logger = logging.getLogger(__name__)

# kept free of heavy imports: `autoglm --help` imports this module (torch/numpy/gguf load inside the functions)
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_k_m")
HF_TYPES = ("int8", "int4")  # mirrors autoglm.quant.apply.MODES


def _source_types() -> tuple[set[Any], set[Any]]:
    """(float types, quantized source types we can decode)."""
    from gguf import GGMLQuantizationType as Q

    floats = {Q.F32, Q.F16, Q.BF16}
    quant = {Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_K, Q.IQ4_NL,
             Q.IQ4_XS}  # fmt: skip
    return floats, quant


@dataclass
class QuantizeReport:
    """What `quantize_gguf` wrote: per-tensor types and the byte totals."""

    tensor_types: dict[str, GGMLQuantizationType] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0


def _open(path: str | Path) -> GGUFReader:
    from gguf import GGUFReader

    try:
        return GGUFReader(path, "r")
    except FileNotFoundError:
        raise CorruptFile(f"{path}: no such file") from None
    except (ValueError, OSError, IndexError) as e:
        raise CorruptFile(f"{path}: not a readable GGUF file ({e})") from None


def _n_layers(reader: GGUFReader, arch: str) -> int:
    from autoglm.gguf.quants import layer_of

    f = reader.fields.get(f"{arch}.block_count")
    if f is not None:
        return int(f.contents())
    layers = [i for t in reader.tensors if (i := layer_of(t.name)) is not None]
    return max(layers) + 1 if layers else 0


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, file_type: int) -> None:
    from gguf import GGUFValueType, Keys

    for f in reader.fields.values():
        # GGUF.* are virtual fields; the writer adds the architecture itself
        if f.name.startswith("GGUF.") or f.name in (Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE):
            continue
        if f.name == Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(f.contents()))
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    writer.add_file_type(file_type)


def quantize_gguf(src: str | Path, dst: str | Path, target: str, *, progress: bool = True) -> QuantizeReport:
    """Write `dst`: `src` with its weights re-encoded to `target` ("q4_k_m", "q8_0", "f16", ...)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import Keys

    from autoglm.gguf.quants import QuantMix

    float_types, quant_source = _source_types()
    mix = QuantMix.parse(target)
    if Path(src).resolve() == Path(dst).resolve():
        raise UnsupportedQuantType(f"{dst}: output would overwrite the input file")
    reader = _open(src)
    arch_field = reader.fields.get(Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise CorruptFile(f"{src}: no general.architecture key")
    arch = str(arch_field.contents())
    n_layers = _n_layers(reader, arch)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names and "token_embd.weight" in names

    report = QuantizeReport()
    plan: list[tuple[object, tuple[int, ...], GGMLQuantizationType]] = []
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists ne[0] (the row) first
        if t.tensor_type in float_types or t.tensor_type in quant_source:
            new = mix.type_for(t.name, shape, n_layers, tied_embeddings=tied)
        else:
            new = Q(t.tensor_type)  # integer tensors etc.: copied as they are
        plan.append((t, shape, new))
        report.tensor_types[t.name] = new

    out = Path(dst)
    if out.is_dir():
        raise InvalidRequest(f"{dst}: is a directory; give the .gguf file to write", param="output")
    if not out.parent.is_dir():
        raise InvalidRequest(f"{dst}: the directory {out.parent} does not exist", param="output")
    part = out.with_name(out.name + ".part")  # renamed into place when complete: a failure leaves no OUT behind
    try:
        report = _write(reader, part, arch, mix, plan, report, progress)
        part.replace(out)
    finally:
        part.unlink(missing_ok=True)
    return report


def _write(reader: Any, part: Path, arch: str, mix: Any, plan: list, report: Any, progress: bool) -> Any:
    import numpy as np
    from gguf import GGUFWriter
    from tqdm import tqdm

    from autoglm.gguf.quants import dequantize, quantize, row_nbytes

    writer = GGUFWriter(part, arch)
    _copy_metadata(reader, writer, int(mix.file_type))
    for t, shape, new in plan:
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        rb = row_nbytes(new, shape[-1], t.name)
        writer.add_tensor_info(t.name, (*shape[:-1], rb), np.dtype(np.uint8), rows * rb, raw_dtype=new)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    total = sum(int(t.n_elements) for t, _, _ in plan)
    with tqdm(total=total, unit="w", unit_scale=True, desc=f"quantize {mix.name}", disable=not progress) as bar:
        for t, shape, new in plan:
            bar.set_postfix_str(f"{t.name} -> {new.name}", refresh=False)
            if new == t.tensor_type:
                data = np.ascontiguousarray(t.data).view(np.uint8)  # already in the target type: copy the bytes
            else:
                w = dequantize(t.data, t.tensor_type, shape, name=t.name)
                data = quantize(w, new, name=t.name)
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
            report.bytes_in += int(t.n_bytes)
            report.bytes_out += int(data.nbytes)
            bar.update(int(t.n_elements))
    writer.close()
    return report


def input_kind(path: str | Path) -> str:
    """ "gguf" (a file with the GGUF magic) or "hf" (a directory with config.json); the content decides."""
    p = Path(path)
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf"
        raise CorruptFile(f"{p}: a directory without config.json is not an HF model directory")
    if not p.exists():
        raise CorruptFile(f"{p}: no such file or directory")
    with open(p, "rb") as fh:
        if fh.read(4) == b"GGUF":
            return "gguf"
    raise CorruptFile(f"{p}: neither a GGUF file (no GGUF magic) nor an HF model directory (config.json)")


def quantize_hf(src: str | Path, dst: str | Path, mode: str, *, group_size: int = 32) -> dict[str, int]:
    """HF directory -> quantized HF directory (`autoglm.tools.quantize.quantize_hf_checkpoint`); {format: bytes}."""
    from autoglm.tools.quantize import quantize_hf_checkpoint

    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise InvalidRequest(f"{dst}: output would overwrite the input directory", param="output")
    if (dst / "config.json").exists():
        raise InvalidRequest(f"{dst}: already holds a model (config.json); choose a new directory", param="output")
    return quantize_hf_checkpoint(src, dst, mode, group_size=group_size)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `autoglm quantize` to the CLI."""
    p = subparsers.add_parser(
        "quantize",
        help="re-quantize a GGUF file (q4_k_m, q8_0, ...) or an HF directory (int8, int4)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="source .gguf file or HF model directory")
    p.add_argument("output", help="destination .gguf file (GGUF input) or new directory (HF input)")
    p.add_argument("type", type=str.lower, choices=(*TYPES, *HF_TYPES), metavar="TYPE",
                   help=f"GGUF input: one of {', '.join(TYPES)}; HF input: {' or '.join(HF_TYPES)}")  # fmt: skip
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (HF input) [32]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _is_speech(path: str) -> bool:
    from autoglm.speech.conformer import conformer_kind

    return conformer_kind(path) == "hf"


def _run_speech(args: argparse.Namespace) -> int:
    """Speech HF dir -> OUT.onnx (fp32) + OUT.int8.onnx (autoglm.quant.speech_onnx)."""
    from autoglm.quant.speech_onnx import export_speech_dir

    if args.type != "int8":
        raise UnsupportedQuantType(f"{args.input} is a speech (CTC Conformer) directory: TYPE must be int8 "
                                   f"(ONNX dynamic quantization), not {args.type!r}", param="type")  # fmt: skip
    for path, size in export_speech_dir(args.input, args.output).items():
        print(f"{path}: {size / 2**20:.1f} MiB")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        kind = input_kind(args.input)
        if kind == "hf" and _is_speech(args.input):
            return _run_speech(args)
        if kind == "hf":
            if args.type not in HF_TYPES:
                raise UnsupportedQuantType(
                    f"{args.input} is an HF directory: TYPE must be {' or '.join(HF_TYPES)}, not {args.type!r} "
                    f"(for GGUF block types: `autoglm convert {args.input} -o OUT.gguf --outtype ...`)",
                    param="type",
                )
            written = quantize_hf(args.input, args.output, args.type, group_size=args.group_size)
        else:
            if args.type in HF_TYPES:
                raise UnsupportedQuantType(
                    f"{args.input} is a GGUF file: TYPE must be a GGUF type ({', '.join(TYPES)}), not {args.type!r}; "
                    "GGUF weights already run quantized (q8_0 is the int8 counterpart)",
                    param="type",
                )
            rep = quantize_gguf(args.input, args.output, args.type, progress=not args.no_progress)
    except AutoGLMError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    if kind == "hf":
        total = sum(written.values())
        parts = ", ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in sorted(written.items(), key=lambda kv: -kv[1]))
        print(f"{args.output}: {args.type} HF checkpoint, {total / 2**20:.1f} MiB ({parts})")
        return 0
    counts: dict[str, int] = {}
    for qt in rep.tensor_types.values():
        counts[qt.name] = counts.get(qt.name, 0) + 1
    mix = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    print(f"{args.output}: {len(rep.tensor_types)} tensors ({mix}); {rep.bytes_in / 2**20:.1f} MiB -> "
          f"{rep.bytes_out / 2**20:.1f} MiB")  # fmt: skip
    return 0
