"""Device placement policy: is the asked device usable, and how weights go onto an accelerator.

- `check_device`: `--device cuda` (or `cuda:N`) with a torch that has no CUDA, or no such GPU, is a ConfigError
  naming the torch build, before anything is read from disk.
- `accelerator_dtype`: "auto" on CUDA is the checkpoint's 16-bit dtype, else bfloat16 (float32 activations would
  halve the GPU's matmul and memory throughput for nothing the models need).
- `dense_gguf`: a GGUF model on CUDA is dequantized once at load to that dtype (ordinary `Linear` / `Embedding`
  weights, cuBLAS GEMMs, CUDA-graph capturable) instead of keeping the blocks and dequantizing per matmul with the
  torch reference codecs, which on a GPU costs a few dozen small kernels per weight per step. Dequantizing is the
  simple correct choice (the codecs are bit-exact, so the weights equal llama.cpp's dequantized ones); it costs
  memory (2 bytes per weight: a 1.5 B model is ~3 GiB) and decode bandwidth (Q4_K reads ~3.5x fewer bytes); a
  quantized CUDA matmul (llama.cpp's MMVQ / a Triton kernel) is the later step that would win that back.
"""

from __future__ import annotations

from typing import Any

import torch

from autoglm.errors import ConfigError

_HALF = (torch.bfloat16, torch.float16)


def check_device(device: torch.device | str, what: str = "--device") -> torch.device:
    """`device` as a torch.device, or a ConfigError saying why this process cannot use it."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{what} {device!r} is not a device (cpu, cuda, cuda:1, ...): {e}", param="device") from e
    if d.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else " (a CPU-only build)")
            raise ConfigError(
                f"{what} {device}: CUDA is not available to this process ({build}); install a CUDA build of torch "
                "(https://pytorch.org/get-started/locally/) and check that a GPU is visible (nvidia-smi, "
                "CUDA_VISIBLE_DEVICES), or use --device cpu",
                param="device",
            )
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise ConfigError(f"{what} {device}: only {n} CUDA device(s) are visible (cuda:0..cuda:{n - 1})",
                              param="device")
    return d


def accelerator_dtype(device: torch.device, checkpoint: torch.dtype | None = None) -> torch.dtype | None:
    """The "auto" activation dtype on `device`: None off CUDA (the loader's own rule applies)."""
    if device.type != "cuda":
        return None
    return checkpoint if checkpoint in _HALF else torch.bfloat16


def dense_gguf(device: torch.device, asked: Any = None) -> bool:
    """Whether GGUF weights are dequantized at load: `asked` when given (True/False), else on CUDA."""
    return bool(asked) if asked is not None else device.type == "cuda"
