"""Speech benchmark: our Whisper (CTranslate2 model.bin loaded into PyTorch) vs faster-whisper on the same file.

Real-time factor (seconds of compute per second of audio) for a 15 s clip and a 60 s file of espeak-ng speech,
the same threads and beam size for both, word error rate of both against the spoken text, and the peak RSS of each
engine (each runs in its own process so the numbers do not mix). Usage:

    python benchmarks/speech_bench.py [--model CT2_DIR] [--threads 2] [--beam-size 1] [--json out.json]

Without --model, Whisper base is assembled from its PyPI wheels (tests/fixtures/speech.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please open the settings and turn on the flashlight.",
    "Send a message to my mother saying that I will be home late tonight.",
    "What is the weather going to be like tomorrow morning in Beijing?",
    "Set an alarm for seven thirty and remind me to buy some milk.",
    "Call the restaurant and book a table for four people at eight o'clock.",
    "Turn the volume down and play some relaxing music in the living room.",
    "Take a screenshot of this page and share it with my colleagues.",
]


def _speech(seconds: float) -> tuple[Any, str]:
    """espeak-ng sentences (with short pauses) cut at a sentence boundary near `seconds` -> (samples, text)."""
    import numpy as np

    from tests.fixtures.speech import espeak_samples

    parts, words, total, i = [], [], 0, 0
    gap = np.zeros(8000, np.float32)
    while True:
        s = SENTENCES[i % len(SENTENCES)]
        x = espeak_samples(s)
        if x is None:
            raise SystemExit("espeak-ng is not installed")
        if total + x.shape[0] > seconds * 16_000 and parts:
            break
        parts += [x, gap]
        words.append(s)
        total += x.shape[0] + gap.shape[0]
        i += 1
    audio = np.concatenate(parts)
    pad = int(seconds * 16_000) - audio.shape[0]
    if pad > 0:
        audio = np.concatenate([audio, np.zeros(pad, np.float32)])
    return audio, " ".join(words)


def _norm(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("o'clock", "oclock")).split()


def wer(ref: str, hyp: str) -> float:
    r, h = _norm(ref), _norm(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
            prev, d[j] = d[j], cur
    return d[len(h)] / max(1, len(r))


def _child(engine: str, model: str, threads: int, beam: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    clips = {name: _speech(sec) for name, sec in (("15s", 15.0), ("60s", 60.0))}
    t0 = time.perf_counter()
    if engine == "autoglm":
        from autoglm.speech.load import load_speech_model

        rec = load_speech_model(model).recognizer

        def run(x: Any) -> str:
            return rec.transcribe(x, language="en", beam_size=beam).text
    else:
        from faster_whisper import WhisperModel

        fw = WhisperModel(model, device="cpu", cpu_threads=threads, num_workers=1)

        def run(x: Any) -> str:
            segs, _ = fw.transcribe(x, language="en", beam_size=beam, temperature=0.0, vad_filter=False)
            return "".join(s.text for s in segs).strip()
    load_s = time.perf_counter() - t0
    run(clips["15s"][0][: 16_000 * 3])  # warm-up
    out: dict[str, Any] = {"engine": engine, "load_s": round(load_s, 2)}
    for name, (x, ref) in clips.items():
        t = time.perf_counter()
        text = run(x)
        dt = time.perf_counter() - t
        out[name] = {"seconds": round(dt, 2), "rtf": round(dt / (x.shape[0] / 16_000), 4),
                     "wer": round(wer(ref, text), 4), "text": text}
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="CTranslate2 Whisper directory (default: Whisper base wheels)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beam-size", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--omp-wait-policy", default=None, choices=["PASSIVE", "ACTIVE"],
                    help="OMP_WAIT_POLICY for both engines (PASSIVE helps torch on an oversubscribed CPU)")
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    model = args.model
    if model is None:
        from tests.fixtures.speech import whisper_base_ct2_dir

        base = whisper_base_ct2_dir()
        if base is None:
            raise SystemExit("no --model and the Whisper base wheels are not installed")
        model = str(base)
    if args.engine:
        print(json.dumps(_child(args.engine, model, args.threads, args.beam_size)))
        return
    results = []
    for engine in ("autoglm", "faster-whisper"):
        cmd = [sys.executable, __file__, "--engine", engine, "--model", model, "--threads", str(args.threads),
               "--beam-size", str(args.beam_size)]
        env = dict(os.environ)
        if args.omp_wait_policy:
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=True, env=env)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ours, fw = results
    print(f"model {model}  threads {args.threads}  beam {args.beam_size}  OMP_WAIT_POLICY "
          f"{args.omp_wait_policy or os.environ.get('OMP_WAIT_POLICY', '(unset)')}  load average {os.getloadavg()}")
    print(f"{'engine':<16}{'load s':>8}{'15s RTF':>10}{'60s RTF':>10}{'15s WER':>9}{'60s WER':>9}{'peak RSS MB':>13}")
    for r in results:
        print(f"{r['engine']:<16}{r['load_s']:>8}{r['15s']['rtf']:>10}{r['60s']['rtf']:>10}"
              f"{r['15s']['wer']:>9}{r['60s']['wer']:>9}{r['peak_rss_mb']:>13}")
    for clip in ("15s", "60s"):
        print(f"{clip}: autoglm / faster-whisper time ratio {ours[clip]['seconds'] / fw[clip]['seconds']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
