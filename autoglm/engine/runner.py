"""A scheduled batch -> packed tensors -> encoders + decoder -> logits -> sampled tokens. Decides no policy.

Builds the attention backend once (`make_backend`: it owns the K/V tensors, one `[num_blocks, block_size, n_kv,
head_dim]` pair per `Attention` layer, on the decoder's device) and hands it to every step in the `AttentionContext`.
`deterministic` (EngineConfig.deterministic): batch-invariant linears and attention, so a token's logits do not
depend on what shares its step, on chunking or on the prefix cache (layers/linear/batch_invariant.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from autoglm.engine.cuda_graphs import decode_graphs
from autoglm.engine.encoder_cache import EncoderCache
from autoglm.engine.kv_cache import slot_mapping
from autoglm.engine.memory import KVCachePlan, attention_layers
from autoglm.engine.prompt import MediaItem
from autoglm.engine.request import Request
from autoglm.engine.sampler import Sampler, SamplingRow, TokenLogprob
from autoglm.engine.scheduler import ScheduledBatch
from autoglm.errors import UnsupportedModality
from autoglm.layers.attention import AttentionContext, make_backend
from autoglm.layers.linear.batch_invariant import set_batch_invariant
from autoglm.layers.linear.gguf import prepare_weights
from autoglm.models.base import PreparesDecode
from autoglm.models.loaded import LoadedModel


class ModelRunner:
    def __init__(
        self,
        model: LoadedModel,
        plan: KVCachePlan,
        *,
        encoder_cache_memory: int = 0,
        attention_backend: str = "auto",
        cuda_graphs: bool = True,
        deterministic: bool = False,
    ) -> None:
        self.model = model
        self.decoder = model.decoder
        self.block_size = block_size = plan.block_size
        self.dtype, self.device = plan.dtype, plan.device
        num_blocks, cache_dtype = plan.num_blocks, plan.cache_dtype
        self.layers = attention_layers(model)
        prepare_weights(model.decoder)  # explicit one-time repack for the chosen kernels (no-op when done/none)
        self.deterministic = deterministic
        set_batch_invariant(model.decoder, deterministic)  # per model: the engine's choice, set both ways
        if isinstance(self.decoder, PreparesDecode):  # the weights are final: the one-call stack's operands, once
            self.decoder.prepare_decode()
        # the decoder lives on one device (encoders may be elsewhere)
        self.backend = make_backend(
            self.layers, num_blocks=num_blocks, block_size=block_size, dtype=cache_dtype, device=self.device,
            kind=attention_backend,
            batch_invariant=deterministic,
        )
        # decode steps replayed as CUDA graphs (CUDA + a graph-safe backend only; else None: eager)
        self.graphs = decode_graphs(self.decoder, self.backend, torch.device(self.device), cuda_graphs)
        self.sampler = Sampler()
        self.encoder_cache = EncoderCache(encoder_cache_memory)
        self.num_encoder_runs = 0  # encoder calls (one per media item not found in any cache)
        self._bitmask: Tensor | None = None  # grammar masks of one step's constrained rows, reused across steps

    def release(self) -> None:
        if self.graphs is not None:
            self.graphs.release()
        self.backend.release()
        self.encoder_cache.clear()

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[tuple[Request, int, TokenLogprob | None]]:
        """Run one step; returns (request, token, logprob) for each request that reaches the end of its tokens."""
        ids: list[int] = []
        positions: list[Tensor] = []
        slots: list[int] = []
        logit_rows: list[int] = []  # packed index of each sampling request's last token
        samplers: list[Request] = []
        score_spans: list[tuple[Request, int, int]] = []  # LLM.score: every position of these spans
        media_rows: list[tuple[int, Tensor]] = []  # (packed start index, embeddings rows)
        start = 0
        for req, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            c = req.num_computed_tokens
            ids.extend(req.token_ids[c : c + n])
            positions.append(req.positions.span(c, c + n))
            slots.extend(slot_mapping(req.block_table, c, c + n, self.block_size))
            media_rows.extend(self._media_rows(req, c, c + n, start))
            if req.return_prompt_logits:
                score_spans.append((req, start, n))
            if c + n == req.num_tokens:
                logit_rows.append(start + n - 1)
                samplers.append(req)
            start += n
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)  # [T]
        pos = self._pack_positions(positions)
        max_blocks = max(len(r.block_table) for r in batch.requests)
        tables = torch.tensor(
            [r.block_table + [r.block_table[0]] * (max_blocks - len(r.block_table)) for r in batch.requests],
            dtype=torch.long,
            device=self.device,
        )  # [B, max_blocks]; padding with a valid block id, never read
        ctx = AttentionContext(
            query_lens=list(batch.num_new_tokens),
            context_lens=[r.num_computed_tokens + n for r, n in zip(batch.requests, batch.num_new_tokens, strict=True)],
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_tables=tables,
            backend=self.backend,
        )
        self.backend.prepare(ctx)
        embeds = None
        if media_rows:
            embeds = self.decoder.embed_tokens(input_ids)  # [T, D]
            for at, rows in media_rows:
                embeds[at : at + rows.shape[0]] = rows.to(embeds.device, embeds.dtype)
        hidden = self.graphs.run(input_ids, pos, ctx, embeds) if self.graphs is not None else None
        if hidden is None:
            hidden = self.decoder(input_ids, pos, ctx, inputs_embeds=embeds)  # [T, D]
        for req, at, n in score_spans:
            req.prompt_logits.append(self.decoder.compute_logits(hidden[at : at + n]).float().cpu())
        if not samplers:
            return []
        logits = self.decoder.compute_logits(hidden[logit_rows])  # [S, V]
        rows = [_sampling_row(r, self._grammar_mask(r, i, len(samplers))) for i, r in enumerate(samplers)]
        tokens, logprobs = self.sampler(logits, rows)
        return list(zip(samplers, tokens, logprobs, strict=True))

    def _grammar_mask(self, req: Request, row: int, batch: int) -> Tensor | None:
        """Row `row` of a reused CPU bitmask filled from the request's grammar; None for a free request."""
        state = req.grammar_state
        if state is None:
            return None
        if self._bitmask is None or self._bitmask.shape[0] < batch or self._bitmask.shape[1] != state.width:
            self._bitmask = torch.empty((max(batch, 8), state.width), dtype=torch.int32)  # [B, vocab / 32]
        state.fill_mask(self._bitmask[row])
        return self._bitmask[row]

    def _pack_positions(self, positions: list[Tensor]) -> Tensor:
        if all(p.dim() == 1 for p in positions):
            return torch.cat(positions).to(self.device)  # [T]
        # a multi-row (M-RoPE) decoder: a text-only request's 1-D positions go on every row
        rows = self.decoder.position_rows
        return torch.cat([p if p.dim() == 2 else p.expand(rows, -1) for p in positions], 1).to(self.device)  # [R, T]

    def _media_rows(self, req: Request, lo: int, hi: int, packed_start: int) -> list[tuple[int, Tensor]]:
        """Embedding rows of the request's media items that overlap tokens [lo, hi), encoding each item once.

        An item whose span crosses a chunk boundary is encoded at its first chunk and sliced for each chunk; its
        rows stay on the request until its prompt is prefilled (the engine then drops them)."""
        out = []
        for k, item in enumerate(req.prompt.media):
            a, b = item.offset, item.offset + item.n_slots
            if b <= lo or a >= hi:
                continue
            if k not in req.media_embeds:
                req.media_embeds[k] = self._cached_encode(item)
            emb = req.media_embeds[k]  # [n_slots, D]
            s, e = max(a, lo), min(b, hi)
            out.append((packed_start + s - lo, emb[s - a : e - a]))
        return out

    def _cached_encode(self, item: MediaItem) -> Tensor:
        if self.encoder_cache.max_bytes <= 0:
            return self._encode(item)
        emb = self.encoder_cache.get(item.modality, item.inputs.content_hash)
        if emb is None:
            emb = self._encode(item)
            self.encoder_cache.put(item.modality, item.inputs.content_hash, emb)
        return emb

    def _encode(self, item: MediaItem) -> Tensor:
        encoder = self.model.encoders.get(item.modality)
        if encoder is None:  # prompt building checks this; a direct PromptInputs may not have
            raise UnsupportedModality(f"no {item.modality} encoder is loaded for this model")
        emb = encoder.encode(item.inputs)
        self.num_encoder_runs += 1
        if emb.shape[0] != item.n_slots:
            raise RuntimeError(f"{item.modality} encoder returned {emb.shape[0]} rows for {item.n_slots} slots")
        return emb.to(self.device, self.dtype)


def _sampling_row(req: Request, token_bitmask: Tensor | None = None) -> SamplingRow:
    p = req.params
    return SamplingRow(
        temperature=float(p.temperature or 0.0),
        top_p=float(p.top_p if p.top_p is not None else 1.0),
        top_k=int(p.top_k or 0),
        min_p=float(p.min_p or 0.0),
        presence_penalty=float(p.presence_penalty or 0.0),
        frequency_penalty=float(p.frequency_penalty or 0.0),
        repetition_penalty=float(p.repetition_penalty if p.repetition_penalty is not None else 1.0),
        prompt_token_ids=req.prompt.token_ids,
        output_token_ids=req.output_token_ids,
        generator=req.generator,
        logprobs=p.logprobs,
        logit_bias=p.logit_bias,
        token_bitmask=token_bitmask,
    )
