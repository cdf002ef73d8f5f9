"""The contract between models, the loader and the engine.

A decoder is an `nn.Module` built on the `meta` device from a config and filled by a loader. The engine never
looks inside it: it calls `embed_tokens`, `forward` and `compute_logits`, and attaches K/V caches to the
`Attention` modules it finds (`autoglm.layers.attention.Attention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

from autoglm.layers.attention import AttentionContext
from autoglm.models.positions import MediaSpan, PromptPositions


@runtime_checkable
class DecoderModel(Protocol):
    """Packed-batch causal decoder.

    prompt_positions(num_tokens, spans) -> PromptPositions   the prompt's RoPE positions (autoglm.models.positions);
        the engine keeps it per request and asks `.span(start, end)` for each step's tokens
    embed_tokens(input_ids [T]) -> [T, D]           input embeddings, already scaled as the model needs
    forward(input_ids [T], positions [T] or [3, T], ctx, inputs_embeds [T, D] | None) -> hidden [T, D]
        `positions` has `position_rows` rows (3 for M-RoPE; 1 is packed as [T]); when `inputs_embeds` is given
        `input_ids` is ignored (media embeddings have been merged into it by the runner).
    compute_logits(hidden [N, D]) -> [N, vocab] float32
    """

    position_rows: int  # 1 (1-D RoPE) or 3 (M-RoPE)
    uses_mrope: bool  # == (position_rows == 3); kept while engine code still reads it
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int

    def prompt_positions(self, num_tokens: int, spans: Sequence[MediaSpan]) -> PromptPositions: ...

    def embed_tokens(self, input_ids: Tensor) -> Tensor: ...

    def forward(
        self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext, inputs_embeds: Tensor | None = None
    ) -> Tensor: ...

    def compute_logits(self, hidden: Tensor) -> Tensor: ...


@runtime_checkable
class PreparesDecode(Protocol):
    """A decoder that can read its decode step's operands once, when its weights are final (`ModelRunner` calls it
    after `prepare_weights`); a module changed afterwards is not seen until it is called again."""

    def prepare_decode(self) -> bool: ...
