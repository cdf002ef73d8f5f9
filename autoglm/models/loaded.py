"""What a loader hands to the engine: the decoder, its encoders, tokenizer, template and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from autoglm.multimodal.encoder import Encoder
    from autoglm.tokenizer.chat_template import ChatTemplate
    from autoglm.tokenizer.tokenizer import Tokenizer


@dataclass
class ModuleInfo:
    """One line of the startup log / `autoglm inspect` / status page."""

    name: str  # "decoder", "vision", "speech", ...
    path: str
    format: str  # "safetensors", "gguf"
    quantization: str  # "float32", "bfloat16", "Q4_K_M", "int8", ...
    device: str
    parameters: int
    bytes: int
    load_seconds: float
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    kernels: str = ""  # compute kernels, e.g. "cpu avx2" (the CPU ISA variant) or "torch"; "" when not reported


@dataclass
class LoadedModel:
    decoder: nn.Module  # implements autoglm.models.base.DecoderModel
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    encoders: dict[str, Encoder] = field(default_factory=dict)  # modality -> encoder
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k, ... from files
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = "model"  # default served name
    path: str = ""
    architecture: str = ""
    max_model_len: int = 4096
    modules: list[ModuleInfo] = field(default_factory=list)
    # A GGUF whose model has vision but no --mmproj was given: image requests raise MissingProjector.
    missing_projector: str | None = None
