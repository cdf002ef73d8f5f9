"""GLM-4.1V vision tower: patch embedding, 2-D rotary ViT blocks, spatial-merge downsample and the patch merger.

Attribute names follow transformers' `Glm4vVisionModel` so checkpoints load by name. The tower takes a packed batch:
all images' patches concatenated (`pixel_values [N, C*T*P*P]`, patches of each image in merge-block-major order as
`autoglm.multimodal.image.patchify` lays them out) and `grid_thw` per image; attention never crosses an image (or a
frame) boundary. Norms, the rotary and silu * up run with the `Kernels` a loader binds (`bind_kernels`; default the
torch reference), as the decoder's do: at 13k patches they are a tenth of the tower's time in plain torch ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm.kernels.base import Kernels
from autoglm.kernels.reference import REFERENCE
from autoglm.layers.activation import GatedProduct
from autoglm.layers.linear import Linear
from autoglm.layers.norm import RMSNorm
from autoglm.layers.rotary import RopeTables, apply_rope, rope_tables
from autoglm.models.config import VisionConfig

Grid = Sequence[int]  # (t, h, w) in patches


class Glm4vVisionPatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal_patch, patch, patch): one linear map per flattened patch."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        k = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.embed_dim = config.hidden_size
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=k, stride=k)

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, C*T*P*P] -> [N, D]; a stride == kernel conv over one patch is a matmul with the flattened kernel
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(self.embed_dim, -1), self.proj.bias)


class Glm4vVisionEmbeddings(nn.Module):
    """Learned `image_size/patch`² position table, bicubically resampled to each image's patch grid."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_positions = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_positions, config.hidden_size)

    def forward(self, x: Tensor, hw: Tensor, grid_hw: Tensor) -> Tensor:
        # x: [N, D]; hw: [N, 2] (row, col) of each patch; grid_hw: [N, 2] its image's (h, w) in patches
        table = self.position_embedding.weight
        side = int(self.num_positions**0.5)
        img = table.float().view(side, side, -1).permute(2, 0, 1).unsqueeze(0)  # [1, D, side, side]
        # patch centres in [-1, 1] of its own image; grid_sample wants (x=col, y=row)
        norm = (hw.float() + 0.5) / grid_hw.float() * 2 - 1  # [N, 2] (row, col)
        grid = norm.flip(-1).view(1, -1, 1, 2).to(img.device)
        pos = F.grid_sample(img, grid, mode="bicubic", align_corners=False, padding_mode="border")  # [1, D, N, 1]
        return x + pos[0, :, :, 0].transpose(0, 1).to(table.dtype).to(x.device)


class Glm4vVisionRotaryEmbedding(nn.Module):
    """2-D axial RoPE: the first half of each head's rotated dims follow the patch row, the second the column."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.kernels: Kernels = REFERENCE  # handed to the tables (`apply_rope`)

    def use_kernels(self, kernels: Kernels) -> None:
        self.kernels = kernels

    def tables(self, hw: Tensor) -> RopeTables:
        """hw [N, 2] -> whole-head tables for `apply_rope`, built once per forward and shared by every block."""
        cos, sin = self(hw)
        return rope_tables(cos, sin, self.head_dim, interleaved=False, kernels=self.kernels)

    def forward(self, hw: Tensor) -> tuple[Tensor, Tensor]:
        # hw: [N, 2] -> cos, sin [N, head_dim/2] float32 (pairs i, i + head_dim/2 rotate together)
        quarter = self.head_dim // 2
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, quarter, 2, dtype=torch.float, device=hw.device) / quarter))
        freqs = hw.float()[:, :, None] * inv_freq  # [N, 2, head_dim/4]
        freqs = freqs.flatten(1)  # [row freqs | col freqs]
        return freqs.cos(), freqs.sin()


class Glm4vVisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor, rope: RopeTables, seqlens: list[int]) -> Tensor:
        # x: [N, D]; rope: the tower's tables over [N] patches; seqlens: tokens per attention segment (sum == N)
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each [N, H, hd]
        # rotary in float32 like the reference, then back to the activation dtype
        q = apply_rope(q.float(), rope).to(x.dtype)
        k = apply_rope(k.float(), rope).to(x.dtype)
        out = torch.empty_like(q)
        start = 0
        for length in seqlens:
            sl = slice(start, start + length)
            # [1, H, L, hd] bidirectional attention within one image frame
            o = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None]
            )
            out[sl] = o[0].transpose(0, 1)
            start += length
        return self.proj(out.reshape(n, -1))


class Glm4VisionMlp(nn.Module):
    """SwiGLU; the tower's MLP width is `out_hidden_size` (as in the reference), not `intermediate_size`."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d, i = config.hidden_size, config.out_hidden_size
        self.gate_proj = Linear(d, i)
        self.up_proj = Linear(d, i)
        self.down_proj = Linear(i, d)
        self.act = GatedProduct(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class Glm4vVisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = Glm4vVisionAttention(config)
        self.mlp = Glm4VisionMlp(config)

    def forward(self, x: Tensor, rope: RopeTables, seqlens: list[int]) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, seqlens)
        return x + self.mlp(self.norm2(x))


class Glm4vVisionPatchMerger(nn.Module):
    """Projects merged patches into the decoder's embedding space: proj -> LayerNorm -> GELU -> SwiGLU."""

    def __init__(self, dim: int, context_dim: int, hidden_act: str) -> None:
        super().__init__()
        self.proj = Linear(dim, dim)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = Linear(dim, context_dim)
        self.up_proj = Linear(dim, context_dim)
        self.down_proj = Linear(context_dim, dim)
        self.act = GatedProduct(hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class Glm4vVisionModel(nn.Module):
    """pixel_values [N, C*T*P*P] + grid_thw per image -> [sum(t*h*w/merge²), out_hidden_size] decoder embeddings."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_size = config.patch_size
        self.embeddings = Glm4vVisionEmbeddings(config)
        self.patch_embed = Glm4vVisionPatchEmbed(config)
        self.rotary_pos_emb = Glm4vVisionRotaryEmbedding(
            config.hidden_size // config.num_heads, float(getattr(config, "rope_theta", 10000.0))
        )
        self.blocks = nn.ModuleList([Glm4vVisionBlock(config) for _ in range(config.depth)])
        self.merger = Glm4vVisionPatchMerger(config.out_hidden_size, config.intermediate_size, config.hidden_act)
        self.post_conv_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        m = config.spatial_merge_size
        self.downsample = nn.Conv2d(config.hidden_size, config.out_hidden_size, kernel_size=m, stride=m)
        self.post_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def patch_coords(self, grid_thw: Sequence[Grid], device: torch.device) -> tuple[Tensor, Tensor, list[int]]:
        """-> (row, col) [N, 2] of every patch in merge-block-major order, its image's (h, w) [N, 2], and the
        attention segment lengths (one per frame)."""
        m = self.spatial_merge_size
        coords: list[Tensor] = []
        sizes: list[Tensor] = []
        seqlens: list[int] = []
        for t, h, w in ((int(a), int(b), int(c)) for a, b, c in grid_thw):
            if h % m or w % m:
                raise ValueError(f"grid {(t, h, w)} is not divisible by spatial_merge_size {m}")
            rows = torch.arange(h, device=device).view(h // m, 1, m, 1).expand(h // m, w // m, m, m)
            cols = torch.arange(w, device=device).view(1, w // m, 1, m).expand(h // m, w // m, m, m)
            hw = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)  # [h*w, 2]
            coords.append(hw.repeat(t, 1))
            sizes.append(torch.tensor([h, w], device=device).expand(t * h * w, 2))
            seqlens.extend([h * w] * t)
        return torch.cat(coords), torch.cat(sizes), seqlens

    def forward(self, pixel_values: Tensor, grid_thw: Sequence[Grid] | Tensor) -> Tensor:
        grids = grid_thw.tolist() if isinstance(grid_thw, Tensor) else [list(g) for g in grid_thw]
        n = sum(int(t) * int(h) * int(w) for t, h, w in grids)
        if pixel_values.dim() != 2 or pixel_values.shape[0] != n:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not match grids {grids} ({n} patches)")
        x = self.patch_embed(pixel_values.to(self.device))  # [N, D]
        x = self.post_conv_layernorm(x)
        hw, grid_hw, seqlens = self.patch_coords(grids, x.device)
        rope = self.rotary_pos_emb.tables(hw)
        x = self.embeddings(x, hw, grid_hw)
        for blk in self.blocks:
            x = blk(x, rope, seqlens)
        x = self.post_layernorm(x)
        m = self.spatial_merge_size
        # [N/m², m, m, D] -> [N/m², D*m*m]: a stride == kernel Conv2d over one merge block is a matmul
        x = x.view(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2).reshape(n // (m * m), -1)
        w = self.downsample.weight
        x = F.linear(x, w.reshape(w.shape[0], -1), self.downsample.bias)  # [N/m², out]
        return self.merger(x)
