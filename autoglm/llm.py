"""`autoglm.LLM`: the offline Python API. Every call is requests in the same batch-first `Engine` the server uses
(a single `chat()` is one request in the scheduler; `generate([...])` / `chat([[...], [...]])` batch)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autoglm.config import EngineConfig
from autoglm.engine.engine import Engine
from autoglm.engine.output import RequestOutput
from autoglm.engine.prompt import PromptInputs, assemble_prompt, build_chat_prompt, build_text_prompt
from autoglm.engine.sampler import TokenLogprob
from autoglm.engine.sampling_params import SamplingParams
from autoglm.errors import InvalidRequest, MissingProjector, UnsupportedModality
from autoglm.models.loaded import LoadedModel
from autoglm.multimodal.encoder import Encoder
from autoglm.multimodal.media import MediaPolicy

Messages = Sequence[Mapping[str, Any]]


@dataclass
class Result:
    """One finished request: `text` is the answer (content), `reasoning` the thinking (tags stripped)."""

    text: str
    reasoning: str
    token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, int]
    logprobs: list[TokenLogprob] = field(default_factory=list)


ChatResult = Result
GenerateResult = Result


@dataclass
class Delta:
    """One streamed step: new answer text, new reasoning text, new token ids; `usage` on the last one."""

    text: str
    reasoning: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


def _usage(out: RequestOutput) -> dict[str, int]:
    return {
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": out.num_output_tokens,
        "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
        "reasoning_tokens": out.num_reasoning_tokens,
    }


# The Python API runs with the caller's own permissions: local paths anywhere, no network.
LOCAL_MEDIA = MediaPolicy(allowed_local_media_path="/", allow_remote=False)


class LLM:
    """LLM(model=None -> the built-in default model; an HF directory; a .gguf file (+ mmproj); or a LoadedModel)."""

    def __init__(
        self,
        model: str | Path | LoadedModel | None = None,
        *,
        mmproj: str | Path | None = None,
        dtype: str = "auto",
        device: Any = "cpu",
        no_vision: bool = False,
        max_model_len: int | None = None,
        quantization: str | None = None,
        chat_template: str | None = None,
        cpu_isa: str | None = None,
        **engine_kwargs: Any,
    ) -> None:
        """`cpu_isa`: the CPU kernel variant of a GGUF decoder (`load_model`; None: $AUTOGLM_CPU_ISA, else the best
        this CPU runs); ignored when `model` is already a LoadedModel."""
        if isinstance(model, LoadedModel):
            self.model = model
        else:
            from autoglm.loader import load_model

            self.model = load_model(
                model, mmproj=mmproj, dtype=dtype, device=device, no_vision=no_vision, quantization=quantization,
                chat_template=chat_template, cpu_isa=cpu_isa,
            )
        self.config = EngineConfig.from_sources({"max_model_len": max_model_len, **engine_kwargs})
        self.engine = Engine(self.model, self.config)
        self._lock = threading.Lock()  # the engine is stepped by one caller at a time
        self._buffer: dict[str, list[RequestOutput]] = {}  # outputs not yet taken by their caller
        self._ids = itertools.count()

    # --- text <-> ids ---------------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.model.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.model.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- generation -----------------------------------------------------------------------------------------------
    def chat(
        self,
        messages: Messages | Sequence[Messages],
        *,
        enable_thinking: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        content_format: str = "string",
        **sampling: Any,
    ) -> Result | list[Result]:
        """One conversation -> Result; a list of conversations -> list of Results (run as one batch)."""
        batch = bool(messages) and not isinstance(messages[0], Mapping)
        convs: list[Messages] = list(messages) if batch else [messages]  # type: ignore[list-item]
        prompts = [self._chat_prompt(c, enable_thinking, chat_template_kwargs, content_format) for c in convs]
        results = self._run_all(prompts, SamplingParams.from_kwargs(**sampling))
        return results if batch else results[0]

    def generate(self, prompt: str | Sequence[int] | Sequence[str], **sampling: Any) -> Result | list[Result]:
        """Raw completion: a string (tokenized with the model's special prefix) or token ids -> Result;
        a list of strings -> list of Results (one batch)."""
        batch = not isinstance(prompt, str) and bool(prompt) and isinstance(prompt[0], str)
        raw = list(prompt) if batch else [prompt]
        prompts = [build_text_prompt(self.model, p) for p in raw]  # type: ignore[arg-type]
        results = self._run_all(prompts, SamplingParams.from_kwargs(**sampling))
        return results if batch else results[0]

    def stream(
        self,
        prompt: str | Sequence[int] | Messages,
        *,
        enable_thinking: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        content_format: str = "string",
        **sampling: Any,
    ) -> Iterator[Delta]:
        """Deltas as they are generated: chat messages (list of dicts) or a raw prompt (string / token ids)."""
        if not isinstance(prompt, str) and prompt and isinstance(prompt[0], Mapping):
            inputs = self._chat_prompt(prompt, enable_thinking, chat_template_kwargs, content_format)  # type: ignore[arg-type]
        else:
            inputs = build_text_prompt(self.model, prompt)  # type: ignore[arg-type]
        params = SamplingParams.from_kwargs(**sampling)
        for out in self._run([inputs], params):
            yield Delta(
                text=out.content_delta,
                reasoning=out.reasoning_delta,
                token_ids=out.new_token_ids,
                finished=out.finished,
                finish_reason=out.finish_reason,
                usage=_usage(out) if out.finished else None,
            )

    def score(
        self, prompt: str | Sequence[int], images: Sequence[Any] | None = None, *, media: Sequence[Any] | None = None
    ) -> torch.Tensor:
        """Logits [positions, vocab] float32 for every prompt position (a text is tokenized without special tokens).

        media (`images` is the same argument): decoded items (e.g. PIL images) in prompt order, each filling one
        placeholder token of the prompt (e.g. `<|image|>`), expanded to that item's slots."""
        ids = (
            self.model.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        )
        items = list(media or images or [])
        inputs = PromptInputs(ids)
        if items:
            enc = self._encoder_for(ids)
            kind = enc.part_types[0]  # a raw item is read as a part of the encoder's first type
            inputs = assemble_prompt(ids, [(enc, enc.load({"type": kind, kind: m}, LOCAL_MEDIA)) for m in items])
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        final = None
        for out in self._run([inputs], params, return_prompt_logits=True):
            final = out
        assert final is not None and final.prompt_logits is not None
        return final.prompt_logits

    # --- internals ------------------------------------------------------------------------------------------------
    def _chat_prompt(
        self, messages: Messages, enable_thinking: bool | None, kwargs: Mapping[str, Any] | None, content_format: str
    ) -> PromptInputs:
        return build_chat_prompt(
            self.model,
            messages,
            enable_thinking=enable_thinking,
            chat_template_kwargs=kwargs,
            content_format=content_format,
            media_policy=LOCAL_MEDIA,
        )

    def _encoder_for(self, ids: Sequence[int]) -> Encoder:
        """The encoder whose placeholder the prompt holds (raw media items carry no part type to route by)."""
        present = set(ids)
        found = [e for e in self.model.encoders.values() if e.placeholder_id in present]
        if len(found) == 1:
            return found[0]
        if not self.model.encoders:
            if self.model.missing_projector:
                raise MissingProjector(self.model.missing_projector)
            raise UnsupportedModality(f"model {self.model.name!r} has no media encoder loaded")
        names = ", ".join(e.placeholder for e in self.model.encoders.values())
        raise InvalidRequest(f"score(media=...) needs the prompt to hold the placeholder of exactly one encoder "
                             f"({names}); it holds {len(found)}")

    def _run_all(self, prompts: list[PromptInputs], params: SamplingParams) -> list[Result]:
        text: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
        reasoning: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
        ids: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        lps: dict[int, list[TokenLogprob]] = {i: [] for i in range(len(prompts))}
        final: dict[int, RequestOutput] = {}
        for k, out in self._run_indexed(prompts, params):
            text[k].append(out.content_delta)
            reasoning[k].append(out.reasoning_delta)
            ids[k] += out.new_token_ids
            lps[k] += out.logprobs
            if out.finished:
                final[k] = out
        return [
            Result(
                text="".join(text[k]),
                reasoning="".join(reasoning[k]),
                token_ids=ids[k],
                finish_reason=final[k].finish_reason,
                usage=_usage(final[k]),
                logprobs=lps[k],
            )
            for k in range(len(prompts))
        ]

    def _run(self, prompts: list[PromptInputs], params: SamplingParams, **kw: Any) -> Iterator[RequestOutput]:
        for _, out in self._run_indexed(prompts, params, **kw):
            yield out

    def _run_indexed(
        self, prompts: list[PromptInputs], params: SamplingParams, **kw: Any
    ) -> Iterator[tuple[int, RequestOutput]]:
        # Several streams may be open at once (even in one thread): whoever steps the engine files every output
        # under its request id; each caller takes only its own. The lock is never held across a `yield`.
        rids = {f"llm-{next(self._ids)}": k for k in range(len(prompts))}
        try:
            with self._lock:
                for rid, k in rids.items():
                    self.engine.add_request(rid, prompts[k], params, **kw)
                    self._buffer[rid] = []
            pending = set(rids)
            while pending:
                with self._lock:
                    mine = [(rid, out) for rid in rids if (outs := self._buffer.get(rid)) for out in outs]
                    for rid in rids:
                        if rid in self._buffer:
                            self._buffer[rid] = []
                    if not mine:
                        if not self.engine.has_unfinished():
                            raise RuntimeError(f"requests {sorted(pending)} vanished from the engine")  # bug guard
                        for out in self.engine.step():
                            if out.request_id in self._buffer:
                                self._buffer[out.request_id].append(out)
                        continue
                for rid, out in mine:
                    if out.error is not None:  # ended by the engine (timeout, a failed step): raise it here
                        raise out.error
                    if out.finished:
                        pending.discard(rid)
                    yield rids[rid], out
        finally:
            with self._lock:
                for rid in rids:  # early exit (error, generator closed): free their KV blocks now
                    self.engine.abort(rid)
                    self._buffer.pop(rid, None)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
