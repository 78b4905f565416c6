"""nn.MultiheadAttention with its four projections as separate Linear layers.

``nn.MultiheadAttention`` reads ``in_proj_weight`` and ``out_proj.weight`` directly
(``F.multi_head_attention_forward``), so swapping its submodules changes nothing it
computes. :class:`SplitMultiheadAttention` computes the same attention with
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` called as modules, in plain
matmul / softmax arithmetic that exports to standard ONNX ops; each projection is
then an ordinary ``nn.Linear`` that ``quantize_model`` can quantize like any other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SplitMultiheadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (same call signature and results).

    Not supported (refused on conversion): ``add_bias_kv`` and ``add_zero_attn``.
    ``_qkv_same_embed_dim`` is False on purpose: it turns off the fused fast paths of
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder``, which would read the
    projection weights directly and bypass their quantizers.
    """

    _qkv_same_embed_dim = False  # see the class docstring
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None,
                 batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> SplitMultiheadAttention:
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not "
                             "supported")
        split = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.out_proj.bias is not None,
                    mha.kdim, mha.vdim, mha.batch_first)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.chunk(3)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = (mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None
                      else (None, None, None))
            for proj, weight, bias in zip((split.q_proj, split.k_proj, split.v_proj), weights,
                                          biases, strict=True):
                proj.weight.copy_(weight)
                if bias is not None:
                    proj.bias.copy_(bias)
            split.out_proj.load_state_dict(mha.out_proj.state_dict())
        return split.train(mha.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, E] -> [N, heads, T, head_dim]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
              is_causal: bool, length: int, dtype: torch.dtype) -> torch.Tensor | None:
        """One additive mask broadcastable to [N, heads, T, S] (-inf where not attended)."""
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(length, length, dtype=torch.bool).triu(1)
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:  # [N * heads, T, S]
                mask = mask.unflatten(0, (-1, self.num_heads))
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype)[:, None, None, :]
            mask = padding if mask is None else mask + padding
        return mask

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # the projections always see [N, T, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, query.shape[1], scores.dtype)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = self.out_proj((weights @ v).transpose(1, 2).flatten(2))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights.squeeze(0) if unbatched else weights


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: not attended) as 0 / -inf; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def split_attention(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by its split form, in place, and
    turn off ``nn.TransformerEncoder``'s nested-tensor fast path (it reads the projection
    weights directly). Returns the names of the replaced modules."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            split = SplitMultiheadAttention.from_float(getattr(parent, child))
        except ValueError as exc:
            raise ValueError(f"layer {name}: {exc}") from exc
        setattr(parent, child, split)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
    return names
