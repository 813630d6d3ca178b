"""A tiny causal Transformer language model over token ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class CharTransformer(nn.Module):
    """``Embedding + learned positions -> n_layers x TransformerEncoderLayer (causal mask,
    pre-norm) -> LayerNorm -> Linear`` to next-token logits.

    Args:
        vocab_size: tokens (from the data).
        in_shape: (block_size,), the longest sequence (from the data).
        d_model, n_heads, n_layers, dim_feedforward, dropout: the encoder's sizes.
    """

    def __init__(
        self,
        vocab_size: int,
        in_shape: Sequence[int],
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        dim_feedforward: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.block_size = int(in_shape[0])
        self.embed = nn.Embedding(vocab_size, d_model)
        # positions as a module of their own (not a bare Parameter of this one): instruments
        # that work per module (per-sample norms) then see a small Embedding, not the model
        self.pos = nn.Embedding(self.block_size, d_model)
        nn.init.normal_(self.pos.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) int64 -> (B, T, V) logits
        t = tokens.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size {self.block_size}")
        positions = torch.arange(t, device=tokens.device).expand(tokens.shape[0], t)
        h = self.embed(tokens) + self.pos(positions)  # (B, T, d)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        h = self.encoder(h, mask=mask, is_causal=True)  # position t sees positions <= t
        return self.head(self.norm(h))
