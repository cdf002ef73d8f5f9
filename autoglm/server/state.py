"""What the routes share: the loaded model, its engine, the config, metrics and health checks (`app.state.autoglm`)."""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from autoglm.errors import AuthenticationError, ModelNotFound, ServiceUnavailable
from autoglm.multimodal.media import MediaPolicy
from autoglm.server.config import ARTICLE_MODEL_NAME, ServerConfig
from autoglm.server.constraints import ModelConstraints
from autoglm.server.engine_client import EngineClient
from autoglm.server.health import HealthChecker
from autoglm.server.metrics import Metrics

if TYPE_CHECKING:
    from autoglm.models.loaded import LoadedModel
    from autoglm.server.speech_service import SpeechService


@dataclass
class ServerState:
    config: ServerConfig
    metrics: Metrics
    model: LoadedModel | None = None
    engine: EngineClient | None = None  # autoglm.engine.async_engine.AsyncEngine, or a test's stand-in
    health: HealthChecker | None = None
    load_error: str | None = None
    speech: SpeechService | None = None  # when a speech module is loaded
    speech_unavailable: str | None = None  # why there is none (named in input_audio / /v1/audio/* refusals)
    started: float = field(default_factory=time.time)
    constraints: ModelConstraints | None = None  # tool format + grammar compiler, built on first use
    _constraints_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def media(self) -> MediaPolicy:
        c = self.config
        return MediaPolicy(
            allowed_local_media_path=c.allowed_local_media_path,
            allow_remote=c.allow_remote_media,
            max_bytes=c.max_image_bytes,
            max_pixels=c.max_image_pixels,
            timeout=c.remote_media_timeout,
        )

    @property
    def served_names(self) -> list[str]:
        """The names clients may send, first = the model's own. Without --served-model-name the article's name is
        an alias (unless --strict-model-name): /v1/models lists it with `parent` = the model that answers."""
        if self.config.served_model_name:
            return list(self.config.served_model_name)
        names = [self.model.name if self.model is not None else "model"]
        if not self.config.strict_model_name and ARTICLE_MODEL_NAME not in names:
            names.append(ARTICLE_MODEL_NAME)
        return names

    @property
    def max_model_len(self) -> int:
        if self.engine is not None:
            return self.engine.max_model_len  # the engine's resolved context window
        if self.config.max_model_len is not None:
            return self.config.max_model_len
        return self.model.max_model_len if self.model is not None else 0

    def ready_model(self) -> LoadedModel:
        if self.model is None or self.engine is None:
            raise ServiceUnavailable(self.load_error or "the model is still loading; retry when /health/ready is 200")
        return self.model

    def output_constraints(self) -> ModelConstraints:
        """The serving model's tool format and grammar compiler (created on first use, kept here)."""
        model = self.ready_model()
        with self._constraints_lock:
            if self.constraints is None or self.constraints.model is not model:
                self.constraints = ModelConstraints(model)
            return self.constraints

    def ready_engine(self) -> EngineClient:
        if self.model is None or self.engine is None:
            raise ServiceUnavailable(self.load_error or "the model is still loading; retry when /health/ready is 200")
        return self.engine

    def resolve_model_name(self, requested: str | None) -> str:
        """The name responses carry; 404 for a name we do not serve (an empty or missing name means the default).
        A --served-model-name is echoed as sent (vLLM); the implicit article alias is answered with the real name,
        so a response never claims to come from a model that is not there."""
        names = self.served_names
        if not requested:
            return names[0]
        if requested in self.config.served_model_name:
            return requested
        if requested in names:
            return names[0]

        from autoglm.server.ollama_models import v1_name  # `autoglm create` models are served by name too

        if v1_name(self, requested) is not None:
            return requested
        raise ModelNotFound(f"The model `{requested}` does not exist.")

    def check_api_key(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise AuthenticationError(
                "Incorrect API key provided. Send the server's key as `Authorization: Bearer KEY`.",
                code="invalid_api_key",
            )


def get_state(request: Request) -> ServerState:
    return request.app.state.autoglm
