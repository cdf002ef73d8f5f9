"""`/api/*` routes: Ollama's API on the same port as `/v1` (chat, generate, tags, show, ps, version, create, copy,
delete, blobs; embed / pull / push answer why they cannot).

Errors use Ollama's shape `{"error": "..."}` with the status of the autoglm error (404 `model 'x' not found`,
400 for a bad request); after an NDJSON stream has started, an error is one `{"error": ...}` line.
The engine is driven by the generation layer (`generation.py`); this module only formats its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from autoglm.engine.grammar import CompiledGrammar, GrammarSpec
from autoglm.engine.prompt import PromptInputs, build_chat_prompt, build_text_prompt
from autoglm.engine.sampling_params import SamplingParams
from autoglm.engine.structured_output import structured_output_spec
from autoglm.errors import AutoGLMError, ContextTooLong, InvalidRequest
from autoglm.server import ollama_models, ollama_tools
from autoglm.server.constraints import ChatConstraints, keeps_special_tokens
from autoglm.server.errors_http import SafeJSONResponse, request_id_of
from autoglm.server.generation import Completion, Delta, Failed, Finished, Generation, Usage
from autoglm.server.ollama_models import ServedModel
from autoglm.server.protocol import find_lone_surrogate
from autoglm.server.state import ServerState, get_state
from autoglm.store.options import merge_options, sampling_kwargs
from autoglm.store.store import ModelStore
from autoglm.tokenizer.tool_parsers import ToolFormat

log = logging.getLogger("autoglm.server")

NDJSON = "application/x-ndjson"
_OFFLINE = ("offline: no registry. autoglm serves local files only; make a model with `autoglm create NAME -f "
            "Modelfile` (FROM a local GGUF file or Hugging Face directory) or POST /api/create")


class _OllamaRoute(APIRoute):
    """Every failure in an /api route becomes Ollama's `{"error": "..."}` with the error's status."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except AutoGLMError as e:
                request.state.metrics_recorded = True
                log.info("request %s: /api error (%d): %s", request_id_of(request), e.status, e.message)
                return SafeJSONResponse({"error": e.message}, status_code=e.status)  # echoed text may be odd
            except RequestValidationError as e:
                return SafeJSONResponse({"error": f"invalid request: {e.errors()[:1]}"}, status_code=400)
            except Exception:  # a bug: Ollama's shape too, the details only in the log
                rid = request_id_of(request)
                log.exception("request %s: /api %s failed", rid, request.url.path)
                return JSONResponse({"error": f"internal server error (request id {rid}); the details are in the "
                                              "server log"}, status_code=500)

        return wrapped


def _authorized(request: Request) -> None:
    get_state(request).check_api_key(request)


router = APIRouter(prefix="/api", route_class=_OllamaRoute, dependencies=[Depends(_authorized)])


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise InvalidRequest(f"invalid JSON in the request body: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    where = find_lone_surrogate(body)
    if where is not None:
        raise InvalidRequest(f"{where}: text contains a lone UTF-16 surrogate, which is not valid Unicode")
    for key in _STRING_FIELDS:
        if body.get(key) is not None and not isinstance(body[key], str):
            raise InvalidRequest(f"{key} must be a string, got {type(body[key]).__name__}")
    images = body.get("images")
    if images is not None and (not isinstance(images, list) or not all(isinstance(b, str) for b in images)):
        raise InvalidRequest("images must be a list of base64 strings")
    for key in ("options", "messages"):
        kind = dict if key == "options" else list
        if body.get(key) is not None and not isinstance(body[key], kind):
            raise InvalidRequest(f"{key} must be {'an object' if kind is dict else 'a list'}, "
                                 f"got {type(body[key]).__name__}")
    return body


_STRING_FIELDS = ("model", "name", "source", "destination", "from", "prompt", "system", "suffix", "template")


def _now_iso() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


# --- model management --------------------------------------------------------------------------------------------
@router.get("/version")
async def version() -> dict[str, str]:
    from autoglm import __version__

    return {"version": __version__}


@router.get("/tags")
async def tags(request: Request) -> dict[str, Any]:
    return {"models": ollama_models.tag_entries(get_state(request), ModelStore())}


@router.get("/ps")
async def ps(request: Request) -> dict[str, Any]:
    return {"models": ollama_models.ps_entries(get_state(request))}


@router.post("/show")
async def show(request: Request) -> dict[str, Any]:
    body = await _body(request)
    return await asyncio.to_thread(ollama_models.show, get_state(request), body.get("model") or body.get("name"),
                                   ModelStore())


@router.post("/create", response_model=None)
async def create(request: Request) -> Response:
    """Ollama's JSON form (`from`, `files`, `template`, `system`, `parameters`, `messages`, `license`) or the
    older `modelfile` text; a relative FROM path is relative to the server's working directory."""
    body = await _body(request)
    name = body.get("model") or body.get("name")
    if not name:
        raise InvalidRequest("model is required", param="model")
    if body.get("adapters"):
        raise InvalidRequest("adapters are not supported: autoglm has no LoRA adapters yet")
    if body.get("quantize"):
        raise InvalidRequest("quantize is not supported here; use `autoglm quantize` on the source model")
    store = ModelStore()
    if body.get("modelfile"):
        manifest = await asyncio.to_thread(store.create_from_modelfile, name, str(body["modelfile"]))
    else:
        from_ = body.get("from")
        files = body.get("files") or {}
        if not from_ and files:
            if len(files) != 1:
                raise InvalidRequest("files: one GGUF file per model (safetensors uploads are not supported; "
                                     "point `from` at a local Hugging Face directory instead)", param="files")
            from_ = next(iter(files.values()))
        if not from_:
            raise InvalidRequest("neither 'from' nor 'files' was specified", param="from")
        state = get_state(request)
        if not store.exists(str(from_)) and ollama_models.builtin_name(state, str(from_)):
            from_ = state.ready_model().path  # FROM the name this server serves its own model under
        license_ = body.get("license")
        manifest = await asyncio.to_thread(
            store.create, name, from_=str(from_), template=body.get("template"), system=body.get("system"),
            parameters=body.get("parameters") or {}, messages=_messages(body.get("messages")),
            license=[license_] if isinstance(license_, str) else list(license_ or []),
        )
    statuses = ["using existing layer " + manifest.source.digest, "writing manifest", "success"]
    if body.get("stream", True) is False:
        return JSONResponse({"status": "success"})
    return Response("".join(json.dumps({"status": s}) + "\n" for s in statuses), media_type=NDJSON)


def _messages(raw: Any) -> list[dict[str, str]]:
    out = []
    for m in raw or []:
        role = str(m.get("role", "")).lower()
        if role not in ("system", "user", "assistant"):
            raise InvalidRequest(f'message role must be one of "system", "user", or "assistant", got {role!r}')
        out.append({"role": role, "content": str(m.get("content", ""))})
    return out


@router.post("/copy")
async def copy(request: Request) -> Response:
    body = await _body(request)
    if not body.get("source") or not body.get("destination"):
        raise InvalidRequest("source and destination are required")
    state = get_state(request)
    store = ModelStore()
    source = body["source"]
    if not store.exists(source) and ollama_models.builtin_name(state, source):
        raise InvalidRequest(f"'{source}' is the model this server was started with, not a store model; create one "
                             f"FROM it with POST /api/create")
    await asyncio.to_thread(store.copy, source, body["destination"])
    return Response(status_code=200)


@router.delete("/delete")
async def delete(request: Request) -> Response:
    body = await _body(request)
    name = body.get("model") or body.get("name")
    if not name:
        raise InvalidRequest("model is required", param="model")
    await asyncio.to_thread(ModelStore().delete, name)
    return Response(status_code=200)


@router.head("/blobs/{digest}")
async def blob_exists(digest: str) -> Response:
    return Response(status_code=200 if ModelStore().blob_path(digest).is_file() else 404)


@router.post("/blobs/{digest}")
async def blob_upload(digest: str, request: Request) -> Response:
    """A file for `files` in /api/create (what `ollama create` uploads), streamed to disk and checked by digest."""
    store = ModelStore()
    path = store.blob_path(digest)
    if path.is_file():
        return Response(status_code=201)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".upload.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                await asyncio.to_thread(f.write, chunk)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    await asyncio.to_thread(store.adopt_blob, digest, Path(name))
    return Response(status_code=201)


@router.post("/pull")
async def pull() -> Response:
    raise _NotAvailable(_OFFLINE)


@router.post("/push")
async def push() -> Response:
    raise _NotAvailable(_OFFLINE)


@router.post("/embed")
async def embed(request: Request) -> Response:
    body = await _body(request)
    raise _NotAvailable(f"model '{body.get('model', '')}' has no embedding path: autoglm runs generative "
                        "(decoder) models only, so /api/embed and /api/embeddings are not available")


@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    return await embed(request)


class _NotAvailable(AutoGLMError):
    status = 501
    error_type = "not_implemented"


# --- generation --------------------------------------------------------------------------------------------------
def sampling_from_options(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[SamplingParams, int | None]:
    """Modelfile PARAMETERs overlaid by the request's `options` -> (SamplingParams, num_ctx or None)."""
    merged = merge_options(defaults, options)
    return SamplingParams(**sampling_kwargs(merged)), merged.get("num_ctx")


def _think_mode(served: ServedModel, state: ServerState, think: Any) -> tuple[bool | None, str]:
    """Ollama's `think` (true / false / "low" / "medium" / "high") -> (enable_thinking, reasoning mode)."""
    if think is None:
        return None, "separate"
    enabled = think is not False and str(think).lower() not in ("false", "")
    if enabled and "thinking" not in ollama_models.capabilities(state.ready_model(), served.template):
        raise InvalidRequest(f"\"{served.name}\" does not support thinking", param="think")
    return enabled, "separate" if enabled else "hidden"


def _engine_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama messages (bare base64 `images`) -> OpenAI-style messages (image parts first, as phone agents send)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequest(f"messages[{i}] must be an object", param="messages")
        images = m.get("images") or []
        if not isinstance(images, list) or not all(isinstance(b, str) for b in images):
            raise InvalidRequest(f"messages[{i}].images must be a list of base64 strings", param="images")
        content: Any = m.get("content") or ""
        if images:
            parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": _data_url(b)}} for b in images]
            content = [*parts, {"type": "text", "text": content}]
        msg: dict[str, Any] = {"role": str(m.get("role", "user")).lower(), "content": content}
        if m.get("thinking"):
            msg["reasoning_content"] = m["thinking"]
        msg.update(ollama_tools.engine_fields(m))  # tool_calls (arguments objects), a tool result's name
        out.append(msg)
    return out


def _data_url(b64: Any) -> str:
    s = str(b64)
    return s if s.startswith("data:") else "data:image/png;base64," + s  # the decoder sniffs the real format


@dataclass
class _Prepared:
    """A request's prompt, its grammar (None: free text), and how its reply is parsed for tool calls (tool_format
    None: plain content)."""

    prompt: PromptInputs
    grammar: CompiledGrammar | None = None
    tool_format: ToolFormat | None = None
    tools: list[dict[str, Any]] | None = None
    keep_special_tokens: bool = False


def _prepare(state: ServerState, served: ServedModel, messages: list[dict[str, Any]], *,
             enable_thinking: bool | None, tools: list[dict[str, Any]] | None, spec: GrammarSpec | None,
             raw_text: str | None = None, suffix: str | None = None) -> _Prepared:
    """Blocking. Prompt inputs: a raw prompt; the Modelfile's Go TEMPLATE (rendered, then tokenized without added
    specials); or the model's own chat template with the tools and tool history as /v1 renders them."""
    model = state.ready_model()
    mc = state.output_constraints()
    if raw_text is not None:
        return _Prepared(build_text_prompt(model, raw_text, max_len=state.max_model_len),
                         mc.compile(spec) if spec is not None else None)
    if tools is not None and not ollama_models.supports_tools(model, served.template):
        why = ("its Modelfile TEMPLATE does not use .Tools" if served.template is not None else
               "its chat template has no tool-call syntax autoglm can parse")
        raise InvalidRequest(f"{served.name} does not support tools ({why})", param="tools")
    history = [*served.messages, *messages]
    if served.system is not None and not any(m.get("role") == "system" for m in history):
        history = [{"role": "system", "content": served.system}, *history]
    if served.template is not None:
        if any(m.get("images") for m in history):
            raise InvalidRequest(f"images with model '{served.name}': its Modelfile TEMPLATE has no image "
                                 "placeholder; use the server's own model name for image requests", param="images")
        text = served.template.render(history, tools=tools, think=enable_thinking, suffix=suffix,
                                      prompt=history[-1].get("content") if suffix else None)
        fmt = ollama_models.tool_format(model, served.template) if tools is not None else None
        return _Prepared(PromptInputs(token_ids=model.tokenizer.encode(text, add_special_tokens=False), text=text),
                         mc.compile(spec) if spec is not None else None, fmt, tools, keeps_special_tokens(fmt, model))
    constraints = ChatConstraints.make(mc, _engine_messages(history), tools=tools, output_spec=spec)
    prompt = build_chat_prompt(model, constraints.messages, enable_thinking=enable_thinking, content_format="string",
                               media_policy=state.media, max_media=state.config.limit_mm_per_prompt,
                               tools=constraints.tools, max_len=state.max_model_len)
    return _Prepared(prompt, constraints.grammar, constraints.tool_format, constraints.tools,
                     constraints.keep_special_tokens)


def _no_template(state: ServerState, served: ServedModel) -> bool:
    """A model without a chat template of its own (a base model) continues /api/generate prompts as written,
    like Ollama's default template `{{ .Prompt }}` (chat requests get the family's built-in or the ChatML fallback,
    autoglm.tokenizer.builtin_templates)."""
    template = state.ready_model().chat_template
    return served.template is None and (template is None or template.origin in ("builtin", "fallback"))


def _check_context(state: ServerState, n_prompt: int, params: SamplingParams, num_ctx: int | None) -> SamplingParams:
    limit = min(state.max_model_len, num_ctx) if num_ctx and num_ctx > 0 else state.max_model_len
    if n_prompt >= limit:
        raise ContextTooLong(f"the prompt is {n_prompt} tokens, but the context window is {limit} tokens"
                             + (" (num_ctx)" if num_ctx and num_ctx < state.max_model_len else ""), param="num_ctx")
    room = limit - n_prompt
    if params.max_tokens is None or params.max_tokens > room:
        params.max_tokens = room
    return params


@router.post("/chat", response_model=None)
async def chat(request: Request) -> Response:
    body = await _body(request)
    return await _complete(request, body, chat=True)


@router.post("/generate", response_model=None)
async def generate(request: Request) -> Response:
    body = await _body(request)
    return await _complete(request, body, chat=False)


async def _complete(request: Request, body: dict[str, Any], *, chat: bool) -> Response:
    arrival = time.monotonic()
    state = get_state(request)
    rid = request_id_of(request)
    served = await asyncio.to_thread(ollama_models.resolve, state, body.get("model"))
    spec = structured_output_spec(ollama_format=body.get("format"))  # "json" or a JSON schema (400 otherwise)
    messages = body.get("messages") if chat else None
    prompt_text = "" if chat else str(body.get("prompt") or "")
    if (chat and not messages) or (not chat and not prompt_text and not body.get("images")):
        reason = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
        done: dict[str, Any] = {"model": served.name, "created_at": _now_iso(), "done": True, "done_reason": reason}
        done.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        return JSONResponse(done)
    if not isinstance(messages, list) and chat:
        raise InvalidRequest("messages must be a list", param="messages")
    enable_thinking, mode = _think_mode(served, state, body.get("think"))
    params, num_ctx = sampling_from_options(body.get("options") or {}, served.parameters)
    if not chat:
        if body.get("system") is not None:
            served.system = str(body["system"])
        if body.get("template"):
            from autoglm.tokenizer.ollama_template import OllamaTemplate

            served.template = OllamaTemplate(str(body["template"]))
        messages = [{"role": "user", "content": prompt_text, "images": body.get("images") or []}]
        served.messages = []  # Ollama's generate uses the Modelfile's SYSTEM but not its MESSAGE history
    raw = prompt_text if not chat and (body.get("raw") or _no_template(state, served)) else None
    tools = ollama_tools.request_tools(body.get("tools")) if chat else None
    history = ollama_tools.checked_history(messages) if chat else list(messages or [])
    prep = await asyncio.to_thread(_prepare, state, served, history, enable_thinking=enable_thinking, tools=tools,
                                   spec=spec, raw_text=raw, suffix=body.get("suffix"))
    params = _check_context(state, len(prep.prompt.token_ids), params, num_ctx)
    params.grammar = prep.grammar  # the same grammar engine as /v1's response_format: a mask in the sampler
    if prep.keep_special_tokens:  # the tool-call markup is special tokens: the parser must see them
        params.skip_special_tokens = False
    gen = Generation(state, request, rid=rid, endpoint="chat" if chat else "completions", model_name=served.name,
                     stream=body.get("stream", True) is not False, mode=mode, arrival=arrival)
    await gen.start(prep.prompt, params)  # every rejection is a clean error status here, before any byte
    fmt = _OllamaFormat(gen, served.name, chat, prep)
    if not gen.stream:
        return JSONResponse(fmt.whole(await gen.collect()))
    return StreamingResponse(fmt.lines(), media_type=NDJSON)


class _OllamaFormat:
    """The generation layer's events as Ollama chat / generate objects (NDJSON lines or one object)."""

    def __init__(self, gen: Generation, model: str, chat: bool, prep: _Prepared) -> None:
        self.gen = gen
        self.model = model
        self.chat = chat
        self.prep = prep

    def _object(self, content: str, thinking: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": self.model, "created_at": _now_iso()}
        if self.chat:
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                msg["thinking"] = thinking
            if calls:
                msg["tool_calls"] = calls
            obj["message"] = msg
        else:
            obj["response"] = content
            if thinking:
                obj["thinking"] = thinking
        obj["done"] = False
        return obj

    def _final(self, reason: str | None, usage: Usage, content: str = "", thinking: str = "",
               calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        now = time.monotonic()
        arrival = self.gen.arrival
        first = self.gen.first_token or now
        obj = self._object(content, thinking, calls)
        obj.update(done=True, done_reason="length" if reason == "length" else "stop",
                   total_duration=int((now - arrival) * 1e9), load_duration=0,
                   prompt_eval_count=usage.prompt_tokens, prompt_eval_duration=int((first - arrival) * 1e9),
                   eval_count=usage.completion_tokens, eval_duration=int((now - first) * 1e9))
        return obj

    def whole(self, c: Completion) -> dict[str, Any]:
        thinking = c.reasoning if isinstance(c.reasoning, str) else ""
        content, calls = c.content, []
        if self.prep.tool_format is not None:  # the /v1 parser; Ollama's call shape
            content, calls = ollama_tools.reply(self.prep.tool_format.parse(c.content, self.prep.tools))
        return self._final(c.finish_reason, c.usage, content, thinking, calls)

    async def lines(self) -> AsyncIterator[str]:
        fmt = self.prep.tool_format
        parser = ollama_tools.ToolCallLines(fmt, self.prep.tools) if fmt is not None else None
        async with contextlib.aclosing(self.gen.events()) as events:
            async for event in events:
                if isinstance(event, Delta):
                    content, calls = parser.feed(event.content) if parser is not None else (event.content, [])
                    if parser is None or content or calls or event.reasoning:  # else the parser holds it back
                        yield _line(self._object(content, event.reasoning, calls))
                elif isinstance(event, Finished):
                    content, calls = parser.finish() if parser is not None else ("", [])
                    if content or calls:  # what the parser held back: the last call, trailing text
                        yield _line(self._object(content, "", calls))
                    yield _line(self._final(event.reason, event.usage))
                elif isinstance(event, Failed):
                    error = event.error
                    message = error.message if isinstance(error, AutoGLMError) else \
                        "internal error; the details are in the server log"
                    yield _line({"error": message})


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"  # compact NDJSON, as Ollama writes
