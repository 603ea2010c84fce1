"""Left padding: a batch of token sequences as `input_ids` and `attention_mask` tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[rows, longest]` input ids padded on the left with `pad_id`, and the 0/1 mask."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids))
            mask[row, width - len(ids) :] = 1
    return input_ids, mask
