"""Which model an Ollama-style name means, and how `/api/tags`, `/api/show` and `/api/ps` describe it.

A name is either one the server was started with (`--served-model-name`, with or without `:latest`) or a model in
the local store (`autoglm create`). A store model is served by this process when its FROM is the file or directory
the process has loaded; it brings its own Go TEMPLATE, SYSTEM, MESSAGEs and PARAMETERs. One model per process:
a store model over another file is refused with a message that says how to serve it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from autoglm.errors import InvalidRequest, ModelNotFound
from autoglm.store.store import DEFAULT_TAG, Manifest, ModelStore, full_name
from autoglm.tokenizer.tool_parsers import ToolFormat, detect_tool_format

if TYPE_CHECKING:
    from autoglm.models.loaded import LoadedModel
    from autoglm.tokenizer.ollama_template import OllamaTemplate


class ServerState(Protocol):
    """What this module reads of `autoglm.server.state.ServerState` (a Protocol: state.py imports this module)."""

    model: LoadedModel | None
    engine: Any
    started: float

    @property
    def served_names(self) -> list[str]: ...

    @property
    def max_model_len(self) -> int: ...

    def ready_model(self) -> LoadedModel: ...


@dataclass
class ServedModel:
    """What a request's `model` resolves to. `manifest` is None for the process's own (built-in) model."""

    name: str  # as echoed back ("name:tag")
    manifest: Manifest | None = None
    template: OllamaTemplate | None = None  # the Modelfile's Go TEMPLATE (None: the model's own chat template)
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)


def _with_tag(name: str) -> str:
    return name if ":" in name.split("/")[-1] else f"{name}:{DEFAULT_TAG}"


def builtin_name(state: ServerState, name: str) -> str | None:
    for served in state.served_names:
        if name in (served, _with_tag(served)):
            return _with_tag(served)
    return None


def same_model(manifest: Manifest, model: LoadedModel) -> bool:
    """The manifest's FROM is the file/directory this process loaded (by real path, or by size and digest)."""
    if not model.path:
        return False
    loaded = Path(model.path)
    if os.path.realpath(manifest.source.path) == os.path.realpath(loaded):
        return True
    if loaded.is_file() and manifest.source.kind == "gguf" and loaded.stat().st_size == manifest.source.size:
        # an uploaded blob (or a copy) of the same file: same bytes
        return ModelStore().file_digest(loaded.resolve()) == manifest.source.digest
    return False


def resolve(state: ServerState, requested: str | None, store: ModelStore | None = None) -> ServedModel:
    """`model` of an /api request -> ServedModel; ModelNotFound (404) or InvalidRequest (400) naming the cause."""
    if not requested:
        raise InvalidRequest("model is required", param="model")
    store = store or ModelStore()
    manifest = None
    try:
        if store.exists(requested):
            manifest = store.get(requested)
    except InvalidRequest:
        manifest = None
    if manifest is None:
        name = builtin_name(state, requested)
        if name is None:
            raise ModelNotFound(f"model '{requested}' not found")
        return ServedModel(name=name)
    model = state.ready_model()
    if not same_model(manifest, model):
        raise InvalidRequest(
            f"model '{manifest.name}' is FROM {manifest.source.path}, but this server has {model.path or model.name} "
            f"loaded (one model per server process): start another server with `autoglm serve "
            f"{manifest.source.path}`", param="model")
    from autoglm.tokenizer.ollama_template import OllamaTemplate

    template = OllamaTemplate(manifest.template) if manifest.template is not None else None
    return ServedModel(name=manifest.name, manifest=manifest, template=template, system=manifest.system,
                       parameters=dict(manifest.parameters), messages=list(manifest.messages))


def v1_name(state: ServerState, requested: str) -> str | None:
    """/v1 name resolution for names beyond --served-model-name: `name:latest` of a served name, or a store model
    FROM the loaded model (served with the model's own chat template); None when there is no such model."""
    try:
        served = resolve(state, requested)
    except ModelNotFound:
        return None
    return requested if served.manifest is not None else served.name


# --- descriptions ------------------------------------------------------------------------------------------------
def _human_params(n: int) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def _params(model: LoadedModel) -> int:
    return sum(m.parameters for m in model.modules)


def loaded_details(model: LoadedModel) -> dict[str, Any]:
    decoder = next((m for m in model.modules if m.name == "decoder"), model.modules[0] if model.modules else None)
    fmt = decoder.format if decoder else ""
    return {"parent_model": "", "format": "gguf" if fmt == "gguf" else "safetensors",
            "family": model.architecture, "families": [model.architecture],
            "parameter_size": _human_params(_params(model)),
            "quantization_level": decoder.quantization if decoder else ""}


def manifest_details(manifest: Manifest, state: ServerState) -> dict[str, Any]:
    model = state.model
    if model is not None and same_model(manifest, model):
        details = loaded_details(model)
    else:
        details = {"parent_model": "", "format": "gguf" if manifest.source.kind == "gguf" else "safetensors",
                   "family": "", "families": [], "parameter_size": "", "quantization_level": ""}
    details["parent_model"] = manifest.from_ if not os.path.exists(manifest.from_) else ""
    return details


def capabilities(model: LoadedModel, template: OllamaTemplate | None) -> list[str]:
    caps = ["completion"]
    if "image" in model.encoders:
        caps.append("vision")
    if "audio" in model.encoders:
        caps.append("audio")
    tok = model.tokenizer
    if tok.token_to_id("<think>") is not None and tok.token_to_id("</think>") is not None:
        caps.append("thinking")
    if supports_tools(model, template):
        caps.append("tools")
    return caps


def tool_format(model: LoadedModel, template: OllamaTemplate | None) -> ToolFormat | None:
    """The tool-call syntax /api/chat parses replies with: what the Modelfile TEMPLATE's text teaches, else what the
    model's own chat template teaches (the same detection as /v1, `detect_tool_format`)."""
    source = template.text if template is not None else model.chat_template.source if model.chat_template else None
    return detect_tool_format(source, model.architecture)


def supports_tools(model: LoadedModel, template: OllamaTemplate | None) -> bool:
    """What /api/chat accepts `tools` for and /api/show lists as "tools": a Modelfile TEMPLATE that uses `.Tools`
    (as Ollama decides); without one, the model's own chat template when it teaches a tool-call syntax autoglm
    parses."""
    if template is not None:
        return "tools" in template.vars
    return tool_format(model, None) is not None


def model_info(model: LoadedModel, context_length: int) -> dict[str, Any]:
    arch = model.architecture or "unknown"
    return {"general.architecture": arch, "general.name": model.name, "general.parameter_count": _params(model),
            f"{arch}.context_length": context_length}


def tag_entries(state: ServerState, store: ModelStore) -> list[dict[str, Any]]:
    """/api/tags: the process's own model under each served name, then every store model."""
    out = []
    model = state.model
    if model is not None:
        size = sum(m.bytes for m in model.modules)
        for name in state.served_names:
            out.append({"name": _with_tag(name), "model": _with_tag(name), "modified_at": _iso(state.started),
                        "size": size, "digest": "", "details": loaded_details(model)})
    for m in store.list():
        out.append({"name": m.name, "model": m.name, "modified_at": m.created_at, "size": m.source.size,
                    "digest": m.digest.split(":")[-1], "details": manifest_details(m, state)})
    return out


def show(state: ServerState, requested: str, store: ModelStore) -> dict[str, Any]:
    served = resolve(state, requested, store)
    model = state.ready_model()
    m = served.manifest
    params = served.parameters
    lines = []
    for k, v in params.items():
        for item in v if isinstance(v, list) else [v]:
            lines.append(f"{k:<30} {_param_text(item)}")
    if m is not None:
        modelfile = (f'# Modelfile generated by "autoglm show"\n# To build a new Modelfile based on this one, '
                     f"replace the FROM line with:\n# FROM {m.name}\n\n" + m.modelfile)
        template = m.template if m.template is not None else _builtin_template(model)
        modified = m.created_at
        license_text = "\n".join(m.license)
    else:
        modelfile = f"# The model this server was started with\nFROM {model.path or model.name}\n"
        template = _builtin_template(model)
        modified = _iso(state.started)
        license_text = ""
    return {
        "modelfile": modelfile, "parameters": "\n".join(lines), "template": template,
        "system": served.system or "", "license": license_text,
        "details": loaded_details(model) if m is None else manifest_details(m, state),
        "model_info": model_info(model, state.max_model_len),
        "capabilities": capabilities(model, served.template), "modified_at": modified,
        "messages": served.messages,
    }


def ps_entries(state: ServerState) -> list[dict[str, Any]]:
    model = state.model
    if model is None or state.engine is None:
        return []
    size = sum(m.bytes for m in model.modules)
    name = _with_tag(state.served_names[0])
    return [{"name": name, "model": name, "size": size, "digest": "", "details": loaded_details(model),
             "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0, "context_length": state.max_model_len}]


def _builtin_template(model: LoadedModel) -> str:
    # the model's own chat template is Jinja (rendered as transformers does), not a Go template
    return model.chat_template.source if model.chat_template is not None else ""


def _param_text(v: Any) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    return str(v).lower() if isinstance(v, bool) else str(v)


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


__all__ = ["ServedModel", "capabilities", "full_name", "ps_entries", "resolve", "show", "supports_tools", "tag_entries",
           "tool_format"]
