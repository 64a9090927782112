""":class:`SparseMultiheadAttention`: ``nn.MultiheadAttention`` with sparse projections.

``nn.MultiheadAttention`` keeps its packed q/k/v projection as a bare ``in_proj_weight``
``[3E, E]`` and reads it, and ``out_proj.weight``, directly in its functional forward, so the
two cannot simply be swapped for :class:`~itop.SparseLinear` modules. This module is a drop-in
replacement: the same constructor arguments it supports, the same forward signature and
results (masks, ``need_weights``, ``average_attn_weights``, ``is_causal``, ``batch_first``,
unbatched inputs), with

- ``in_proj``: a :class:`~itop.SparseLinear` ``E -> 3E`` (the q, k and v projections are its
  row blocks ``[0, E)``, ``[E, 2E)``, ``[2E, 3E)``; the topology manager treats it as one
  layer, as the dense module stores it as one matrix),
- ``out_proj``: a :class:`~itop.SparseLinear` ``E -> E``,

either of which may also be a dense ``nn.Linear`` (a distribution that gives it density 1).
Attention itself runs in ``F.scaled_dot_product_attention`` (or, when the weights are asked
for, in plain softmax attention, as ``nn.MultiheadAttention`` does).

Self-attention (``query is key is value``) projects once. Cross-attention projects ``query``,
``key`` and ``value`` through the whole ``in_proj`` each and keeps one third of each result:
correct, at three times the projection cost of self-attention.

Not supported (``sparsify`` leaves such modules dense and says so): ``kdim``/``vdim`` other
than ``embed_dim``, ``add_bias_kv``, ``add_zero_attn``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import SparseLinear, check_density

__all__ = ["SparseMultiheadAttention", "unsupported_attention_reason"]

Projection = Union[SparseLinear, nn.Linear]


def unsupported_attention_reason(mha: nn.MultiheadAttention) -> Optional[str]:
    """Why ``mha`` cannot become a :class:`SparseMultiheadAttention` (``None`` if it can)."""
    if not mha._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim"
    if mha.bias_k is not None:
        return "add_bias_kv=True"
    if mha.add_zero_attn:
        return "add_zero_attn=True"
    return None


def _additive_mask(mask: Optional[Tensor], dtype: torch.dtype, name: str) -> Optional[Tensor]:
    """A bool mask (True = masked out) as an additive float mask (-inf), a float one as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or float tensor, got {mask.dtype}")
    return mask.to(dtype)


class SparseMultiheadAttention(nn.Module):
    """Multi-head attention whose q/k/v and output projections are sparse layers.

    Args:
        embed_dim, num_heads, dropout, bias, batch_first: as ``nn.MultiheadAttention``.
        density: fraction of active blocks of both projections, in ``(0, 1]``.
        block_size: block side; must divide ``embed_dim``.
        device, dtype: of the parameters.

    Attributes:
        in_proj: ``SparseLinear(embed_dim, 3·embed_dim)`` (or ``nn.Linear``).
        out_proj: ``SparseLinear(embed_dim, embed_dim)`` (or ``nn.Linear``).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, weights or None)`` with the shapes
    of ``nn.MultiheadAttention``: ``query [L, N, E]`` (``[N, L, E]`` with ``batch_first``, or
    unbatched ``[L, E]``), ``key``/``value`` ``[S, N, E]``; ``key_padding_mask [N, S]`` and
    ``attn_mask [L, S]`` or ``[N·num_heads, L, S]``, bool (True = masked out) or float
    (added to the scores); ``weights [N, L, S]`` (``[N, num_heads, L, S]`` when
    ``average_attn_weights=False``).
    """

    # PyTorch's fused transformer fast paths read the dense ``in_proj_weight``; this flag is
    # the one they check that turns them off for this module (the q, k and v projections are
    # the row blocks of one sparse in_proj: the embedding dims are the same).
    _qkv_same_embed_dim = False
    bias_k = bias_v = None
    add_zero_attn = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, *, density: float = 0.1, block_size: int = 32,
                 device=None, dtype=None):
        super().__init__()
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 \
                or embed_dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing embed_dim="
                             f"{embed_dim}, got {num_heads!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        density = check_density(density)
        self.embed_dim = self.kdim = self.vdim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        kw = dict(density=density, block_size=block_size, device=device, dtype=dtype)
        self.in_proj: Projection = SparseLinear(embed_dim, 3 * embed_dim, bias, **kw)
        self.out_proj: Projection = SparseLinear(embed_dim, embed_dim, bias, **kw)

    @property
    def in_proj_bias(self) -> Optional[Tensor]:
        """The q/k/v bias ``[3E]`` (``in_proj.bias``), as ``nn.MultiheadAttention`` names it."""
        return self.in_proj.bias

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention, *,
                   density: Union[float, Tuple[float, float]] = 0.1, block_size: int = 32,
                   init: str = "random",
                   masks: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None,
                   ) -> "SparseMultiheadAttention":
        """A :class:`SparseMultiheadAttention` holding ``mha``'s weights at the active blocks.

        Args:
            mha: an ``nn.MultiheadAttention`` (``kdim = vdim = embed_dim``, no ``add_bias_kv``,
                no ``add_zero_attn``; ``ValueError`` otherwise).
            density: for both projections, or ``(in_proj, out_proj)``; a projection with
                density 1.0 stays a dense ``nn.Linear``.
            block_size, init: as :meth:`SparseLinear.from_dense` (``init="magnitude"`` keeps the
                blocks of largest norm: for pretrained weights).
            masks: optional ``(in_proj mask, out_proj mask)`` topology masks, each as the
                ``mask`` of :meth:`SparseLinear.from_dense` or ``None`` (then drawn by ``init``).
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        reason = unsupported_attention_reason(mha)
        if reason is not None:
            raise ValueError(f"SparseMultiheadAttention does not support {reason}")
        d_in, d_out = density if isinstance(density, tuple) else (density, density)
        d_in, d_out = check_density(d_in, "density"), check_density(d_out, "density")
        w = mha.in_proj_weight
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.embed_dim = self.kdim = self.vdim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.dropout = float(mha.dropout)
        self.batch_first = bool(mha.batch_first)
        opts = dict(block_size=block_size, init=init)
        m_in, m_out = masks if masks is not None else (None, None)
        self.in_proj = (SparseLinear.from_weight(w, mha.in_proj_bias, density=d_in, mask=m_in,
                                                 **opts)
                        if d_in < 1.0 else _dense_linear(w, mha.in_proj_bias))
        op = mha.out_proj
        self.out_proj = (SparseLinear.from_weight(op.weight, op.bias, density=d_out, mask=m_out,
                                                  **opts)
                         if d_out < 1.0 else _dense_linear(op.weight, op.bias))
        self.train(mha.training)
        return self

    def to_dense(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` with the dense weights (zeros outside active blocks)."""
        w_in = _dense_weight(self.in_proj)
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout,
                                    bias=self.in_proj.bias is not None,
                                    batch_first=self.batch_first, device=w_in.device,
                                    dtype=w_in.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(w_in)
            mha.out_proj.weight.copy_(_dense_weight(self.out_proj))
            if self.in_proj.bias is not None:
                mha.in_proj_bias.copy_(self.in_proj.bias)
            if self.out_proj.bias is not None:
                mha.out_proj.bias.copy_(self.out_proj.bias)
        mha.train(self.training)
        return mha

    # ------------------------------------------------------------------ forward
    def _project(self, query: Tensor, key: Tensor, value: Tensor,
                 self_attention: bool) -> Tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        if self_attention:
            return self.in_proj(query).chunk(3, dim=-1)
        return (self.in_proj(query)[..., :E], self.in_proj(key)[..., E:2 * E],
                self.in_proj(value)[..., 2 * E:])

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """See the class docstring (the semantics of ``nn.MultiheadAttention.forward``)."""
        self_attention = key is query and value is query
        batched = query.dim() == 3
        if not batched:                         # [L, E] -> [1, L, E]
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:              # [L, N, E] -> [N, L, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as "
                               "nn.MultiheadAttention)")
        N, L, E = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value, self_attention)
        q = q.reshape(N, L, H, D).transpose(1, 2)
        k = k.reshape(N, S, H, D).transpose(1, 2)
        v = v.reshape(N, S, H, D).transpose(1, 2)
        # like nn.MultiheadAttention: the is_causal hint replaces attn_mask only when there is
        # no key padding mask and no weights are asked for
        causal = is_causal and key_padding_mask is None and not need_weights
        bias = None
        if not causal:
            bias = _additive_mask(attn_mask, q.dtype, "attn_mask")
            if bias is not None and bias.dim() == 3:
                bias = bias.view(N, H, L, S)
            kpm = _additive_mask(key_padding_mask, q.dtype, "key_padding_mask")
            if kpm is not None:
                kpm = kpm.view(N, 1, 1, S)
                bias = kpm if bias is None else bias + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p,
                                                 is_causal=causal)
        else:
            scores = torch.matmul(q * (1.0 / math.sqrt(D)), k.transpose(-2, -1))
            if bias is not None:
                scores = scores + bias
            weights = torch.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")


def _dense_linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _dense_weight(proj: Projection) -> Tensor:
    return proj.dense_weight() if isinstance(proj, SparseLinear) else proj.weight
