"""Fast CPU matmuls on GGUF blocks kept quantized, plugged in behind `gguf_linear.register_matmul_kernel`.

Two paths, picked per call by the number of activation rows M (measured in `benchmarks/kernels.py`):
- M <= `GEMV_MAX_ROWS` (decode): a C++ kernel (`csrc/gemv.cpp`, JIT-built with `-O3 -march=native`) reads
  the raw blocks once per call, unpacking each weight block once for a tile of up to 8 rows (each row's result is
  independent of the batch, bitwise). Activations are quantized to int8 per block of 32 with a float32 scale and
  dotted with the weight's integers by AVX512-VNNI; the result equals `F.linear(x_q, W)` up to float32 summation order,
  where `x_q = d * round(x / d)`, `d = max|x_block| / 127` — so |y - F.linear(x, W)| <= |W| @ (d / 2) per block.
  Without VNNI the kernel dequantizes one row into L1 and keeps the activations in float32 (no activation error).
- larger M (prefill): the weight is dequantized once per call, a slab of rows at a time into a reused buffer (bounded
  memory), by the same C++ code (bit-exact with `gguf.quants`), then one GEMM per slab — in bfloat16 on CPUs with
  BF16 dot products (`PREFILL_BF16`: weight and activations rounded to bfloat16), else float32.

Decode helpers in the same extension (`install()` hands them to `autoglm.layers.norm.set_fused_ops`): rms_norm,
add_rms_norm (residual + post-norm + next pre-norm), norm_rope (per-head norm + rotary), attend_decode (one query per
head over a cache span); float32 CPU only, each equal to its torch composition up to summation order.
Packed weights (`pack_model`, AVX512-VNNI only): PACKED_TYPES modules with rows % 16 == 0 are rearranged on first
use into 16-row interleaved groups (`csrc/pack.cpp`, `csrc/gemv_packed.cpp`; same bytes, so the same memory): one
vpdpbusd then yields 16 outputs, ~2-4.6x faster decode matmuls than the row-major kernel; prefill dequantizes slabs
straight from the packed layout. Packing is lazy so that loading stays
memory-honest (the file's pages are only read when a module first runs, and released as its packed copy is written).
Memory: no float copy of the model is ever kept; transient slabs only.
Types: Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K; others keep the reference path of `GGUFBlockFormat.matmul`.
The extension is built once per (source, torch, CPU) into `<autoglm cache>/torch_extensions/`; if it cannot be
built (no compiler, `AUTOGLM_GGUF_KERNELS=0`), `install()` returns False and nothing changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import Tensor, nn

from autoglm.layers import norm as norm_layers
from autoglm.quant import gguf_linear
from autoglm.quant.gguf_linear import GGUFBlockFormat, register_gemv_kernel, register_matmul_kernel
from autoglm.quant.pages import release_pages

log = logging.getLogger(__name__)

Q = GGMLQuantizationType
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
PACKED_TYPES: tuple[GGMLQuantizationType, ...] = (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K)
PACK_GROUP_ROWS = 16
_PACK_CHUNK_ROWS = 4096  # rows packed (and their file pages released) at a time: bounded transient memory

# activation rows up to which the fused kernel beats dequantize-once + GEMM (benchmarks/kernels.py). The kernel
# unpacks each weight block once for up to 8 rows, so its cost grows by less than a row per row; at 16 rows it still
# beats or ties the GEMM on every gemma-3-270m shape (Q4_K 640x2048 ties, Q5_0/Q6_K/Q8_0 lm_head win clearly)
GEMV_MAX_ROWS = 16
# prefill dequantizes at most this many weight elements at a time into a reused buffer (16 MiB of float32)
DEQUANT_SLAB_ELEMENTS = 1 << 22
_SCRATCH: dict[tuple[int, torch.dtype], Tensor] = {}


def _cpu_has_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text() or "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# Prefill of float32 activations computes in bfloat16 where the CPU has BF16 dot products: the GEMM runs ~2x faster
# (512 tokens, benchmarks/kernels.py) at an activation error (2^-9 relative) no larger than decode's int8-per-32
# quantization. Set False for float32-exact prefill (the GEMM then equals F.linear(x, W) up to summation order).
PREFILL_BF16 = _cpu_has_bf16()

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = sorted(_CSRC.glob("*.cpp"))  # one extension; kernels.h is their shared header
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
_ext: ModuleType | None = None
_ext_failed = False


def _cpu_key() -> str:
    # -march=native code must not be reused on another CPU: key the build by the CPU's flags
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_dir() -> Path:
    from autoglm.default_model import cache_dir

    h = hashlib.sha256()
    sources = [f.read_bytes() for f in [*_SOURCES, _CSRC / "kernels.h"]]
    for part in (*sources, torch.__version__.encode(), " ".join(_FLAGS).encode(), _cpu_key().encode()):
        h.update(part)
    return cache_dir() / "torch_extensions" / f"gguf_kernels_{h.hexdigest()[:16]}"


def extension() -> ModuleType | None:
    """The compiled kernels (built on first call), or None when they cannot be built or are disabled."""
    global _ext, _ext_failed
    if _ext is not None or _ext_failed:
        return _ext
    if os.environ.get("AUTOGLM_GGUF_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        _ext_failed = True
        return None
    try:
        from torch.utils.cpp_extension import load

        build = _build_dir()
        build.mkdir(parents=True, exist_ok=True)
        _ext = load(
            name="autoglm_gguf_kernels",
            sources=[str(f) for f in _SOURCES],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as e:  # no compiler / headers / ninja: keep the reference path
        log.warning("GGUF kernels unavailable (%s: %s); using dequantize-per-call matmuls", type(e).__name__, e)
        _ext_failed = True
        return None
    return _ext


def has_vnni() -> bool:
    """Whether the decode kernel uses int8 activations (AVX512-VNNI build) rather than float32 ones."""
    ext = extension()
    return bool(ext is not None and ext.has_vnni())


def quantize_activations(x: Tensor) -> Tensor:
    """x [M, K] -> the float32 activations the int8 decode kernel effectively multiplies by (d * q per 32)."""
    ext = extension()
    if ext is None:
        raise RuntimeError("GGUF kernels are not available")
    return ext.quantize_activations(x.float().contiguous())


def gemv(x: Tensor, raw: Tensor, fmt: GGUFBlockFormat, exact_activations: bool = False) -> Tensor:
    """x [M, cols] @ W.T -> [M, rows] float32 by the fused kernel (int8 activations unless `exact_activations`)."""
    ext = extension()
    assert ext is not None
    if fmt.packed:
        return ext.gemv_packed(x.float().contiguous(), raw, int(fmt.qtype))
    return ext.gemv(x.float().contiguous(), raw, int(fmt.qtype), exact_activations)


def pack_model(model: nn.Module) -> int:
    """Mark every packable GGUF module of `model` (PACKED_TYPES, rows % 16 == 0, VNNI build) to be packed on first
    use; returns how many were marked. Modules sharing one weight tensor (a tied lm_head) share its packed copy."""
    if not has_vnni():
        return 0
    gguf_linear.set_packing(_pack_module, _unpack_rows)
    shared: dict[int, Tensor] = {}  # source data_ptr -> packed tensor, for this model's modules
    n = 0
    for mod in model.modules():
        fmt = getattr(mod, "weight_format", None)
        if not isinstance(fmt, GGUFBlockFormat) or fmt.packed or fmt.qtype not in PACKED_TYPES:
            continue
        if fmt.rows % PACK_GROUP_ROWS or mod.weight.device.type != "cpu":
            continue
        mod._pack_shared = shared  # type: ignore[assignment]
        mod._pack_pending = True  # type: ignore[assignment]
        n += 1
    return n


def pack_pending(model: nn.Module) -> int:
    """Pack now every module `pack_model` marked (a server warm-up, so the first request does not pay for it);
    returns how many were packed. Peak memory grows by the packed bytes while their file pages are still cached."""
    mods = [m for m in model.modules() if getattr(m, "_pack_pending", False)]
    for mod in mods:
        _pack_module(mod)
    return len(mods)


def _pack_module(mod: nn.Module) -> None:
    fmt: GGUFBlockFormat = mod.weight_format  # type: ignore[assignment]
    raw: Tensor = mod.weight  # type: ignore[assignment]
    shared: dict[int, Tensor] = mod.__dict__.setdefault("_pack_shared", {})
    packed = shared.get(raw.data_ptr())
    if packed is None:
        ext = extension()
        assert ext is not None
        packed = torch.empty(raw.shape, dtype=torch.uint8)
        for s in range(0, fmt.rows, _PACK_CHUNK_ROWS):
            src = raw[s : s + _PACK_CHUNK_ROWS]
            packed[s : s + src.shape[0]] = ext.pack(src.contiguous(), int(fmt.qtype), fmt.cols)
            release_pages(src)  # the file's pages of this chunk: the packed copy replaces them
        shared[raw.data_ptr()] = packed
    gguf_linear.adopt_packed(mod, packed)  # type: ignore[arg-type]


def _unpack_rows(raw: Tensor, fmt: GGUFBlockFormat, ids: Tensor) -> Tensor:
    ext = extension()
    assert ext is not None
    return ext.unpack_rows(raw, int(fmt.qtype), fmt.cols, ids.long())


def _scratch(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    # one reused slab buffer per (thread, dtype): fresh 64 MiB tensors per call cost more in page faults than decoding
    key = (threading.get_ident(), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = torch.empty(max(rows * cols, DEQUANT_SLAB_ELEMENTS), dtype=dtype)
        _SCRATCH[key] = buf
    return buf[: rows * cols].view(rows, cols)


def gemm(x: Tensor, raw: Tensor, fmt: GGUFBlockFormat) -> Tensor:
    """x [M, cols] @ W.T -> [M, rows] in x's dtype: W dequantized once per call, a slab of rows at a time, into a
    reused buffer (at most `DEQUANT_SLAB_ELEMENTS`), then one GEMM per slab in x's dtype (float32 or bfloat16)."""
    ext = extension()
    assert ext is not None
    step = max(1, min(fmt.rows, DEQUANT_SLAB_ELEMENTS // fmt.cols))
    if fmt.packed:  # slabs start on a 16-row group
        step = max(PACK_GROUP_ROWS, step // PACK_GROUP_ROWS * PACK_GROUP_ROWS)
    out = x.new_empty(x.shape[0], fmt.rows)
    for s in range(0, fmt.rows, step):
        n = min(step, fmt.rows - s)
        w = _scratch(n, fmt.cols, x.dtype)  # [slab, cols]
        if fmt.packed:
            ext.dequantize_packed_out(raw, int(fmt.qtype), fmt.cols, s, w)
        else:
            ext.dequantize_out(raw[s : s + n], int(fmt.qtype), fmt.cols, w)
        out[:, s : s + n] = F.linear(x, w)
    return out


def matmul(x: Tensor, raw: Tensor, fmt: GGUFBlockFormat) -> Tensor:
    """The registered kernel: x [..., cols] @ W.T -> [..., rows] in x's dtype (see the module docstring)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, fmt.cols)  # [M, cols]
    if x2.device.type != "cpu" or raw.device.type != "cpu":
        raise RuntimeError("GGUF kernels run on CPU tensors only")
    if x2.shape[0] <= GEMV_MAX_ROWS:
        y = gemv(x2, raw, fmt).to(x.dtype)
    else:
        cd = x2.dtype if x2.dtype in (torch.float32, torch.bfloat16) else torch.float32
        if PREFILL_BF16 and cd == torch.float32:
            cd = torch.bfloat16
        y = gemm(x2.to(cd), raw, fmt).to(x.dtype)
    return y.reshape(*lead, fmt.rows)


def install() -> bool:
    """Register the fast kernels for every supported type; False (nothing registered) if they cannot be built."""
    ext = extension()
    if ext is None:
        return False
    gemv_direct = ext.gemv

    def direct(x: Tensor, raw: Tensor, qid: int) -> Tensor:  # = matmul() for float32 [M <= GEMV_MAX_ROWS, K]
        return gemv_direct(x, raw, qid, False)

    for qtype in SUPPORTED_TYPES:
        register_matmul_kernel(qtype, matmul)
        register_gemv_kernel(qtype, direct, GEMV_MAX_ROWS, owner=matmul)
    if ext.has_vnni():
        gguf_linear.set_packing(_pack_module, _unpack_rows)
        for qtype in PACKED_TYPES:  # packed weights: x [M, K] float32 contiguous, as `direct`
            register_gemv_kernel(qtype, ext.gemv_packed, GEMV_MAX_ROWS, owner=matmul, packed=True)
    norm_layers.set_fused_ops(ext)  # fused norms / residual+norm / norm+rope on the per-token path
    return True


def uninstall() -> None:
    """Remove our kernels from the registry (back to the reference dequantize-per-call path)."""
    for qtype in SUPPORTED_TYPES:
        if gguf_linear._KERNELS.get(qtype) is matmul:
            del gguf_linear._KERNELS[qtype]
        register_gemv_kernel(qtype, None)
        register_gemv_kernel(qtype, None, packed=True)
    norm_layers.set_fused_ops(None)


def installed() -> bool:
    return any(gguf_linear._KERNELS.get(q) is matmul for q in SUPPORTED_TYPES)
