"""Builders for the OpenAI response bodies and SSE chunks (chat and legacy text completions).

Plain dicts rather than pydantic models: which keys are present matters to clients (the reasoning fields are absent,
not null, when a request's reasoning mode does not return them).
"""

from __future__ import annotations

from typing import Any


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def chat_completion(cid: str, created: int, model: str, content: str, reasoning: str | None | bool,
                    finish_reason: str | None, usage_: dict[str, Any], logprobs: dict[str, Any] | None
                    ) -> dict[str, Any]:
    """`reasoning`: text, or None/False. With `separate` mode and no reasoning the fields are null (present)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not False:
        message["reasoning_content"] = reasoning
        message["reasoning"] = reasoning
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage_,
    }


def chat_chunk(cid: str, created: int, model: str, delta: dict[str, Any] | None, *,
               finish_reason: str | None = None, logprobs: dict[str, Any] | None = None,
               usage: dict[str, Any] | None = None, index: int = 0) -> dict[str, Any]:
    """`delta=None` makes the final usage-only chunk (`choices: []`). `index`: the choice (n > 1)."""
    chunk: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    if delta is None:
        chunk["choices"] = []
        chunk["usage"] = usage
    else:
        chunk["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    return chunk


def text_completion(cid: str, created: int, model: str, text: str, finish_reason: str | None,
                    usage_: dict[str, Any], logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage_,
    }


def completion_chunk(cid: str, created: int, model: str, text: str | None, *, finish_reason: str | None = None,
                     logprobs: dict[str, Any] | None = None, usage: dict[str, Any] | None = None, index: int = 0
                     ) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": model}
    if text is None:
        chunk["choices"] = []
        chunk["usage"] = usage
    else:
        chunk["choices"] = [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]
    return chunk


# --- logprobs ----------------------------------------------------------------------------------------------------
def _entry(item: Any) -> tuple[int, float, list[tuple[int, float]]]:
    """Accept the engine's TokenLogprob (token_id, logprob, top) or an equivalent tuple/dict."""
    if isinstance(item, dict):
        return int(item["token_id"]), float(item["logprob"]), list(item.get("top") or [])
    if isinstance(item, tuple):
        return int(item[0]), float(item[1]), list(item[2] if len(item) > 2 else [])
    return int(item.token_id), float(item.logprob), list(item.top or [])


def _token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    try:
        return tokenizer.decode([token_id], skip_special_tokens=False)
    except Exception:
        return tokenizer.id_to_token(token_id) or ""


def _safe(logprob: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number.
    return logprob if logprob > -9999.0 else -9999.0


def chat_logprobs(items: list[Any], tokenizer: Any) -> dict[str, Any]:
    content = []
    for item in items:
        token_id, logprob, top = _entry(item)
        text = _token_text(tokenizer, token_id)
        content.append({
            "token": text,
            "logprob": _safe(logprob),
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := _token_text(tokenizer, tid)), "logprob": _safe(lp), "bytes": list(t.encode("utf-8"))}
                for tid, lp in top
            ],
        })
    return {"content": content}


def completion_logprobs(items: list[Any], tokenizer: Any, offset: int = 0) -> dict[str, Any]:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for item in items:
        token_id, logprob, top = _entry(item)
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        token_logprobs.append(_safe(logprob))
        top_logprobs.append({_token_text(tokenizer, tid): _safe(lp) for tid, lp in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
