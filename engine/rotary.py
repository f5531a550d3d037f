"""RoPE over the r thin key dims, with a frequency table per KV head.

Thin dim j and j + r/2 (j < r/2) form a pair rotated by pos * inv_freq[h, j]
(HF Llama's rotate_half / NeoX convention). The query heads of a GQA group use
their KV head's table. A zero frequency leaves its pair unrotated.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.checkpoint import model_dims


def source_inv_freq(cfg: dict) -> tuple[torch.Tensor, float]:
    """An ordinary checkpoint's rotary inv_freq [D/2] (float32) and attention scaling, as
    transformers computes them from config.json (rope_type default, llama3, yarn, ...)."""
    from transformers import AutoConfig     # heavy; only original checkpoints need it
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        d = model_dims(cfg)[3]
        base = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        return inv, 1.0
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    return inv.float(), float(scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# Precompute cos/sin for every position when the table stays under this many elements.
MAX_CACHED_ELEMENTS = 1 << 22


class ThinRotaryEmbedding(nn.Module):
    """Applies per-KV-head RoPE to thin queries [T, H*r] and keys [T, H_kv*r].

    With `max_position`, cos and sin are tabulated once ([max_position, H_kv, r], sign of
    rotate_half folded into sin) and a step costs two row gathers per layer; otherwise they
    are computed from the positions on the fly."""

    def __init__(self, inv_freq: torch.Tensor, num_heads: int, attention_scaling: float = 1.0,
                 max_position: int | None = None, trainable: bool = False):
        super().__init__()
        num_kv_heads, half = inv_freq.shape
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.rank = 2 * half
        self.attention_scaling = attention_scaling
        # fp32 like HF's inv_freq; not a checkpoint weight (a parameter when calibration
        # learns the frequencies).
        if trainable:
            self.inv_freq = nn.Parameter(inv_freq.detach().to(torch.float32).clone())
        else:
            self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)
        half_perm = torch.cat((torch.arange(half, 2 * half), torch.arange(half)))
        self.register_buffer("perm", half_perm, persistent=False)
        self.cos_table = self.sin_table = None
        if max_position and max_position * num_kv_heads * 2 * half <= MAX_CACHED_ELEMENTS:
            self.cos_table, self.sin_table = self.tables(max_position)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, H_kv, r] (each half repeated)."""
        ang = positions.to(torch.float32)[:, None, None] * self.inv_freq[None]
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos() * self.attention_scaling, ang.sin() * self.attention_scaling

    def tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, H_kv, r] of positions 0..n-1 with rotate_half's sign folded into sin
        (x rotated = x·cos + x[perm]·sin, perm swapping the halves); contiguous."""
        if self.cos_table is not None and self.cos_table.shape[0] >= n:
            return self.cos_table[:n], self.sin_table[:n]
        cos, sin = self.cos_sin(torch.arange(n, device=self.inv_freq.device))
        half = self.rank // 2
        sign = torch.cat((-torch.ones(half), torch.ones(half))).to(sin)
        return cos.contiguous(), (sin * sign).contiguous()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated queries [T, H*r] and keys [T, H_kv*r] at positions [T]."""
        return self.rotate_queries(positions, q), self.rotate_keys(positions, k)

    def rotate_queries(self, positions: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """q [T, H*r] (query head j uses KV head j // group's table) -> rotated, same shape."""
        return self._rotate(positions, q, self.group)

    def rotate_keys(self, positions: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """k [T, ..., H_kv*r] (any batch dims after T) -> rotated at positions [T], same shape."""
        return self._rotate(positions, k, 1)

    def _rotate(self, positions: torch.Tensor, x: torch.Tensor, group: int) -> torch.Tensor:
        t = positions.shape[0]
        x4 = x.reshape(t, -1, self.num_kv_heads, group, self.rank)
        if self.cos_table is not None and x.dtype == torch.float32:
            if self.cos_table.device != x.device:
                self.cos_table = self.cos_table.to(x.device)
                self.sin_table = self.sin_table.to(x.device)
                self.perm = self.perm.to(x.device)
            cos = self.cos_table.index_select(0, positions)[:, None, :, None]  # [T, 1, H_kv, 1, r]
            sin = self.sin_table.index_select(0, positions)[:, None, :, None]  # rotate_half's sign in
            return (x4 * cos).addcmul_(x4.index_select(-1, self.perm), sin).view(x.shape)
        cos, sin = self.cos_sin(positions)
        cos, sin = cos.to(x.dtype)[:, None, :, None], sin.to(x.dtype)[:, None, :, None]
        return (x4 * cos + rotate_half(x4) * sin).reshape(x.shape)
