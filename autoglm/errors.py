"""One exception hierarchy for the whole package, mapped to HTTP in one place (`http_status`, `error_type`).

Every error names its cause (file, tensor, type, parameter) in its message; the server turns it into the OpenAI error
shape `{"error": {"message", "type", "param", "code"}}` with `status` as the HTTP code.
"""

from __future__ import annotations


class AutoGLMError(Exception):
    """Base class. `status` is the HTTP status the server answers with; `error_type` the OpenAI `type` field."""

    status: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


# --- loading -----------------------------------------------------------------------------------------------------
class ModelLoadError(AutoGLMError):
    """A model file or directory cannot be loaded; the message names the file, tensor or type."""

    error_type = "model_load_error"


class ConfigError(ModelLoadError):
    """config.json / GGUF metadata missing or invalid."""


class UnsupportedArchitecture(ModelLoadError):
    """The architecture is not one we implement; the message lists the supported ones."""


class UnsupportedQuantType(ModelLoadError):
    """A tensor's storage type is not supported; the message names the type and the tensor."""


class WeightMismatch(ModelLoadError):
    """Missing, unexpected or wrongly shaped tensors."""


class CorruptFile(ModelLoadError):
    """Truncated or malformed weight file (safetensors, GGUF)."""


class KernelBuildError(AutoGLMError):
    """The optional C++ kernels could not be built or loaded (compiler, timeout, lock); callers fall back to the
    reference ops, so this never reaches a client."""

    error_type = "kernel_build_error"


class CpuIsaError(AutoGLMError):
    """An unknown CPU ISA was asked for, or one this CPU lacks (`AUTOGLM_CPU_ISA`, `--cpu-isa`)."""


# --- requests ----------------------------------------------------------------------------------------------------
class InvalidRequest(AutoGLMError):
    """The client's request is wrong. Never a 5xx."""

    status = 400
    error_type = "invalid_request_error"


class ContextTooLong(InvalidRequest):
    """Prompt (plus requested tokens) does not fit the context window."""


class MediaError(InvalidRequest):
    """An image/audio part cannot be fetched, decoded or is over a limit."""


class MediaTooLarge(MediaError):
    """An uploaded media file is over the server's size cap."""

    status = 413


class MissingProjector(InvalidRequest):
    """An image request reached a model loaded without its vision projector (GGUF without --mmproj)."""


class UnsupportedModality(InvalidRequest):
    """A media part of a kind no loaded encoder handles (e.g. audio without a speech module)."""


class ModelNotFound(AutoGLMError):
    status = 404
    error_type = "not_found_error"
    # OpenAI's code for this case
    def __init__(self, message: str, *, param: str | None = "model", code: str | None = "model_not_found") -> None:
        super().__init__(message, param=param, code=code)


class AuthenticationError(AutoGLMError):
    status = 401
    error_type = "authentication_error"


class Overloaded(AutoGLMError):
    """Waiting queue full: 429 with Retry-After."""

    status = 429
    error_type = "rate_limit_error"


class ServiceUnavailable(AutoGLMError):
    """Draining / not ready."""

    status = 503
    error_type = "service_unavailable"


class RequestAborted(AutoGLMError):
    """A request was cancelled (client disconnect, timeout, shutdown)."""

    status = 499
    error_type = "request_aborted"


class RequestFailed(AutoGLMError):
    """The model step failed for this request alone (the engine isolated it; the rest of its batch continued)."""

    status = 500
    error_type = "internal_error"


class RequestTimeout(AutoGLMError):
    """A request ran past its time limit (`request_timeout`); it was ended and its KV blocks freed."""

    status = 504
    error_type = "timeout_error"
