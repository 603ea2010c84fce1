"""Method `pca`: the first principal component of paired differences, per layer.

Given differences `d_i = harmful_i - partner_i` (`[n, layers, hidden]`), the direction at
layer l is the unit vector `u` that maximises `sum_i (d_i[l] . u)^2`: the top right singular
vector of the `[n, hidden]` difference matrix. It is *uncentered* on purpose: with the pairs
in a consistent order, this equals RepE's PCA over randomly ordered pairs (flipping the sign
of a row leaves `d d^T` unchanged), and it keeps the shift that all pairs share. A centered PCA
would instead find where the differences *vary* most, which for a consistent shift may be
orthogonal to it.

A singular vector has no sign, so `u` is turned to point the way `reference[l]` does (the
difference of means: toward harmful), and scaled to `|reference[l]|` so that the methods'
vectors are comparable in size. Where `u . reference[l]` is exactly zero, the sign that makes
most differences project positively is taken.
"""

from __future__ import annotations

import torch


def principal_directions(differences: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`[layers, hidden]`: per layer, the first principal direction of `differences`.

    Args:
        differences: `[n, layers, hidden]` paired differences (harmful minus partner).
        reference: `[layers, hidden]`, the direction each result is sign-aligned with and whose
            norm it takes.

    Raises:
        ValueError: no differences, or shapes that do not match.
    """
    if differences.ndim != 3 or differences.shape[0] == 0:
        raise ValueError("expected differences of shape [n >= 1, layers, hidden]")
    if differences.shape[1:] != reference.shape:
        raise ValueError(
            f"differences {tuple(differences.shape[1:])} and reference "
            f"{tuple(reference.shape)} differ in shape"
        )
    per_layer = differences.double().transpose(0, 1)  # [layers, n, hidden]
    _, _, right = torch.linalg.svd(per_layer, full_matrices=False)
    units = right[:, 0, :]  # [layers, hidden], unit norm
    reference64 = reference.double()
    alignment = (units * reference64).sum(dim=-1)
    # Fallback for a reference orthogonal to u: the sign of the summed projections.
    votes = torch.einsum("lnh,lh->l", per_layer, units).sign()
    signs = torch.where(alignment != 0, alignment.sign(), votes)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    scaled: torch.Tensor = units * (signs * reference64.norm(dim=-1))[:, None]
    return scaled.to(reference.dtype)
