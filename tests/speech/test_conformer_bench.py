"""Benchmark (slow, no timing assertions): a 15 s clip through the CTC Conformer on 2 threads — PyTorch fp32 vs
onnxruntime fp32 vs onnxruntime INT8 — on a FastConformer-small-shaped random model (d=176, 16 layers)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autoglm.speech.conformer import load_conformer
from tests.fixtures.conformer import tone_clip, write_parakeet

SMALL = dict(
    hidden_size=176,
    num_hidden_layers=16,
    num_attention_heads=4,
    intermediate_size=704,
    conv_kernel_size=9,
    subsampling_factor=8,
    subsampling_conv_channels=176,
    num_mel_bins=80,
)


def _best(fn, repeat: int = 5) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@pytest.mark.slow
def test_bench_15s_clip_torch_vs_onnx(tmp_path: Path) -> None:
    from autoglm.quant.speech_onnx import export_speech_dir

    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    threads = int(os.environ.get("AUTOGLM_BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    src = write_parakeet(tmp_path / "small", SMALL)
    files = export_speech_dir(src, tmp_path / "small.onnx")
    clip = tone_clip(15.0, seed=1)
    rows = []
    for label, path in [("torch fp32", src), *[(f"onnx {Path(f).name}", Path(f)) for f in files]]:
        rec, info = load_conformer(path, threads=threads)
        seconds = _best(lambda rec=rec: rec.transcribe(clip))
        rows.append((label, seconds, info.parameters, info.bytes))
    base = rows[0][1]
    for label, s, params, size in rows:
        print(f"15 s clip, {threads} threads, {label}: {s * 1000:.0f} ms (RTF {s / 15:.4f}, {base / s:.2f}x torch), "
              f"{params / 1e6:.1f} M params, {size / 2**20:.1f} MiB")  # fmt: skip
    assert all(np.isfinite(s) for _, s, _, _ in rows)
