"""Method `diffmean`: the prompt-side difference of means (Arditi et al. 2024).

For one harm category, the direction at layer l is `mean_i harmful[i, l] - mean_j benign[j, l]`:
what the category's harmful prompts add, on average, to the pooled activation of a benign
prompt. The raw difference is kept (its norm says how far apart the two sets lie); the
adapter's coefficients set the norm that is actually added.
"""

from __future__ import annotations

import torch


def difference_of_means(harmful: torch.Tensor, benign: torch.Tensor) -> torch.Tensor:
    """`[layers, hidden]`: mean of `harmful [n, layers, hidden]` minus mean of `benign [m, ...]`.

    Raises:
        ValueError: a set is empty or the two sets differ in shape past the first dimension.
    """
    if harmful.shape[0] == 0 or benign.shape[0] == 0:
        raise ValueError("difference of means needs at least one harmful and one benign row")
    if harmful.shape[1:] != benign.shape[1:]:
        raise ValueError(
            f"harmful rows {tuple(harmful.shape[1:])} and benign rows "
            f"{tuple(benign.shape[1:])} differ in shape"
        )
    # float64 sums: hundreds of rows of norm ~100 lose digits in fp32.
    return (harmful.double().mean(dim=0) - benign.double().mean(dim=0)).to(harmful.dtype)
