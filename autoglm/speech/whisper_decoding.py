"""Decoding one 30 s Whisper window: greedy, sampling or beam search, with Whisper's logit rules.

Rules (as in openai-whisper / CTranslate2, so greedy text matches faster-whisper's): suppressed token ids on every
step, blank/EOT suppressed on the first step, and in timestamp mode the timestamp grammar (timestamps in pairs,
never decreasing, the first token a timestamp <= 1 s, timestamps forced when their total probability beats any text
token). The encoder output is computed once; every beam shares its cross-attention K/V.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from autoglm.errors import InvalidRequest
from autoglm.models.whisper import DecoderCache, WhisperForConditionalGeneration
from autoglm.speech.whisper_tokenizer import WhisperTokenizer

NEG_INF = float("-inf")


@dataclass
class DecodeOptions:
    beam_size: int = 1
    temperature: float = 0.0
    timestamps: bool = False
    max_new_tokens: int = 448  # capped by the decoder positions; faster-whisper (CTranslate2) decodes this far too
    suppress_tokens: list[int] = field(default_factory=list)
    suppress_begin: list[int] = field(default_factory=list)  # blank and EOT on the first step
    max_initial_timestamp: float = 1.0  # seconds
    patience: float = 1.0
    generator: torch.Generator | None = None


@dataclass
class DecodeResult:
    tokens: list[int]  # generated ids, EOT excluded (timestamp ids included in timestamp mode)
    sum_logprob: float
    avg_logprob: float
    no_speech_prob: float


class LogitRules:
    """Applies the suppression and timestamp rules to a step's logits in place."""

    def __init__(self, tok: WhisperTokenizer, opts: DecodeOptions, vocab_size: int) -> None:
        self.tok = tok
        self.opts = opts
        self.vocab_size = vocab_size
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        ids = [i for i in opts.suppress_tokens if 0 <= i < vocab_size]
        mask[ids] = True
        if opts.timestamps:
            mask[tok.no_timestamps] = True
        else:
            mask[tok.timestamp_begin :] = True  # no timestamp ids when they were not asked for
        self.suppress = mask
        self.begin = [i for i in opts.suppress_begin if 0 <= i < vocab_size]
        self.max_initial = round(opts.max_initial_timestamp / 0.02)

    def __call__(self, logits: Tensor, generated: list[list[int]]) -> None:
        # logits: [B, V] float32; generated: the tokens sampled so far per row
        logits[:, self.suppress] = NEG_INF
        first = len(generated[0]) == 0
        if first and self.begin:
            logits[:, self.begin] = NEG_INF
        if self.opts.timestamps:
            self._timestamps(logits, generated, first)

    def _timestamps(self, logits: Tensor, generated: list[list[int]], first: bool) -> None:
        ts, eot = self.tok.timestamp_begin, self.tok.eot
        for row, seq in enumerate(generated):
            last_ts = len(seq) >= 1 and seq[-1] >= ts
            penult_ts = len(seq) < 2 or seq[-2] >= ts
            if last_ts:
                if penult_ts:
                    logits[row, ts:] = NEG_INF  # a pair just closed: text next
                else:
                    logits[row, :eot] = NEG_INF  # an opened pair: its closing timestamp or EOT next
            stamps = [t for t in seq if t >= ts]
            if stamps:
                floor = stamps[-1] if last_ts and not penult_ts else stamps[-1] + 1
                logits[row, ts:floor] = NEG_INF  # timestamps never go back
        if first:
            logits[:, :ts] = NEG_INF
            logits[:, ts + self.max_initial + 1 :] = NEG_INF
        logprobs = torch.log_softmax(logits, dim=-1)
        ts_mass = torch.logsumexp(logprobs[:, ts:], dim=-1)
        text_max = logprobs[:, :ts].max(dim=-1).values
        force = ts_mass > text_max
        if bool(force.any()):
            logits[force, :ts] = NEG_INF


def _prefill(
    model: WhisperForConditionalGeneration, states: Tensor, prompt: list[int], rows: int, max_len: int, sot_index: int,
    no_speech: int,
) -> tuple[DecoderCache, Tensor, float]:
    cache = model.new_cache(states, rows, max_len)
    ids = torch.tensor([prompt], dtype=torch.long).expand(rows, -1)
    logits = model.decode(ids, cache, last_only=False)  # [rows, T, V]
    no_speech_prob = float(torch.softmax(logits[0, sot_index], dim=-1)[no_speech])
    return cache, logits[:, -1].clone(), no_speech_prob


@torch.inference_mode()
def decode_window(
    model: WhisperForConditionalGeneration,
    tok: WhisperTokenizer,
    states: Tensor,
    prompt: list[int],
    opts: DecodeOptions,
) -> DecodeResult:
    """Decode one window. states: encoder output [1, S, D]; prompt: [<|startofprev|> ...] sot_sequence [...]."""
    vocab = model.config.vocab_size
    steps = min(opts.max_new_tokens, model.config.max_target_positions - len(prompt))
    if steps <= 0:
        raise InvalidRequest(f"the prompt fills the decoder ({len(prompt)} of {model.config.max_target_positions} "
                             "positions)", param="prompt")
    max_len = len(prompt) + steps
    rules = LogitRules(tok, opts, vocab)
    sot_index = prompt.index(tok.sot)
    if opts.beam_size > 1 and opts.temperature == 0.0:
        return _beam_search(model, tok, states, prompt, opts, rules, max_len, steps, sot_index)
    cache, logits, no_speech_prob = _prefill(model, states, prompt, 1, max_len, sot_index, tok.no_speech)
    tokens: list[int] = []
    sum_logprob = 0.0
    for step in range(steps):
        rules(logits, [tokens])
        logprobs = torch.log_softmax(logits, dim=-1)[0]
        if opts.temperature > 0:
            probs = torch.softmax(logits[0] / opts.temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=opts.generator))
        else:
            nxt = int(logits[0].argmax())
        sum_logprob += float(logprobs[nxt])
        if nxt == tok.eot:
            break
        tokens.append(nxt)
        if step + 1 == steps:
            break
        logits = model.decode(torch.tensor([[nxt]]), cache)
    return DecodeResult(tokens, sum_logprob, sum_logprob / (len(tokens) + 1), no_speech_prob)


def _beam_search(
    model: WhisperForConditionalGeneration,
    tok: WhisperTokenizer,
    states: Tensor,
    prompt: list[int],
    opts: DecodeOptions,
    rules: LogitRules,
    max_len: int,
    steps: int,
    sot_index: int,
) -> DecodeResult:
    """openai-whisper's beam search: keep `beam_size` live beams, collect finished ones until
    beam_size * patience are done, rank by sum log-prob / length."""
    k = opts.beam_size
    cache, logits, no_speech_prob = _prefill(model, states, prompt, k, max_len, sot_index, tok.no_speech)
    beams: list[list[int]] = [[] for _ in range(k)]
    scores = [0.0] * k
    finished: dict[tuple[int, ...], float] = {}
    want = round(k * opts.patience)
    for step in range(steps):
        rules(logits, beams)
        logprobs = torch.log_softmax(logits, dim=-1)  # [k, V]
        top_lp, top_ids = logprobs.topk(k + 1, dim=-1)
        candidates: dict[tuple[int, ...], tuple[float, int]] = {}
        # at the first step every beam is the same prompt: expand row 0 only
        for row in range(1 if step == 0 else k):
            for lp, t in zip(top_lp[row].tolist(), top_ids[row].tolist(), strict=True):
                seq = (*beams[row], t)
                score = scores[row] + lp
                if seq not in candidates or candidates[seq][0] < score:
                    candidates[seq] = (score, row)
        new_beams: list[list[int]] = []
        new_scores: list[float] = []
        parents: list[int] = []
        for seq, (score, row) in sorted(candidates.items(), key=lambda kv: -kv[1][0]):
            if seq[-1] == tok.eot:
                if len(finished) < want and seq[:-1] not in finished:
                    finished[seq[:-1]] = score
            else:
                new_beams.append(list(seq))
                new_scores.append(score)
                parents.append(row)
            if len(new_beams) == k:
                break
        if len(finished) >= want or step + 1 == steps or not new_beams:
            for seq, score in zip(new_beams, new_scores, strict=True):
                if len(finished) >= want:
                    break
                finished.setdefault(tuple(seq), score)
            break
        cache.reorder(torch.tensor(parents))
        beams, scores = new_beams, new_scores
        logits = model.decode(torch.tensor([[b[-1]] for b in beams]), cache)
    if not finished:
        finished = {tuple(b): s for b, s in zip(beams, scores, strict=True)}
    best, best_score = max(finished.items(), key=lambda kv: kv[1] / max(1, len(kv[0])))
    return DecodeResult(list(best), best_score, best_score / (len(best) + 1), no_speech_prob)


@torch.inference_mode()
def detect_language(
    model: WhisperForConditionalGeneration, tok: WhisperTokenizer, states: Tensor
) -> tuple[str, dict[str, float]]:
    """The most likely language after <|startoftranscript|> -> (code, {code: probability})."""
    cache = model.new_cache(states, 1, 1)
    logits = model.decode(torch.tensor([[tok.sot]]), cache)[0]  # [V]
    codes = list(tok.languages)
    ids = torch.tensor([tok.languages[c] for c in codes])
    probs = torch.softmax(logits[ids], dim=-1)
    best = int(probs.argmax())
    return codes[best], {c: float(p) for c, p in zip(codes, probs.tolist(), strict=True)}
