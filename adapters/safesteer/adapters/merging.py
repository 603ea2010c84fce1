"""Interference-aware combination of category vectors: what a row adds when several are on.

The built-in categories share most of their direction (a common "refuse" component; on the
SmolLM2 adapter the mean pairwise cosine is about 0.75), so the naive weighted sum counts
the shared part once per category. Per layer, with effective vectors `v_c` (coefficient *
vector), norms `n_c`, unit vectors `u_c` and a row's weights `w_c`:

`naive`
    `x = sum_c w_c v_c`, one matmul (`SteeringBasis.table`).

`orthogonal` (shared components once)
    Each active category (`w_c != 0`) asks for `d_c = w_c n_c` along its own direction `u_c`;
    the naive sum gives it `x.u_c = d_c + sum_{c' != c} w_c' n_c' (u_c'.u_c)`, i.e. also every
    other category's overlap with it. `orthogonal` returns the smallest `x` that gives each
    active category exactly its demand: `x = sum_c b_c u_c` with `K b = d`, `K` the cosine
    Gram matrix of the active categories (`K_cc' = u_c.u_c'`). So
    - mutually orthogonal vectors: `K = I`, the naive sum;
    - one category, or identical directions with equal demands: that one vector, once;
    - identical directions with different demands: their mean demand, once.
    Solved through `K = Q diag(lam) Q^T` as `b = Q diag(1 / max(lam, tolerance)) Q^T d`: an
    eigenvalue below `tolerance` means the active directions nearly coincide in some
    combination (two vectors at cosine c give `lam = 1 - c`); flooring it keeps `x` bounded
    and continuous instead of amplifying the tiny difference between near-duplicates, and for
    exact duplicates that combination has no length at all. Linear in `w` for a fixed set of
    active categories (`x = w @ B_A` with a transformed basis `B_A`), piecewise linear
    overall; costs one batched `C x C` eigendecomposition per row and layer.

`ties` (sign consensus, after TIES-merging)
    Per row, layer and coordinate `h`, with contributions `t_c = w_c v_c[h]`: elect the sign
    of `sum_c t_c`, drop the contributions of the other sign (and zeros), and average the rest
    (disjoint mean). With `density < 1`, each category first keeps only its largest-magnitude
    `density` share of coordinates per layer (TIES's trim step). Not linear (the elected sign
    and the mean's denominator depend on `w`), not rotation-invariant (it works coordinate by
    coordinate), but elementwise: `O(rows x categories x layers x hidden)` per row, no loop.

All three give a lone category at weight `k` exactly `k v_c`. They differ in how strong a
*mix* is, so an adapter's coefficients hold for one scheme: `safesteer extract` calibrates
the naive default mix (under `orthogonal` or `ties` that mix is weaker than the recipe's
`scale` says); `safesteer build-adapter` calibrates one category alone and names the scheme
in the recipe's `merge` (`merge_scheme` reads it; the server and `safesteer eval` use it
unless told otherwise).

`python -m safesteer.adapters.merging --adapter FILE` prints, per layer, the pairwise cosines
and the norm of the all-categories mix under each scheme relative to one category's norm.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import AdapterError
from safesteer.adapters.table import SteeringBasis

SCHEMES: tuple[str, ...] = ("naive", "orthogonal", "ties")
# Floor for the cosine Gram matrix's eigenvalues in `orthogonal`; two directions at cosine
# above 0.9 are merged as one.
DEFAULT_TOLERANCE = 0.1
DEFAULT_DENSITY = 1.0


def _check(basis: torch.Tensor, weights: torch.Tensor) -> None:
    if basis.ndim != 3:
        raise ValueError(f"expected a [categories, layers, hidden] basis, got {tuple(basis.shape)}")
    if weights.ndim != 2 or weights.shape[1] != basis.shape[0]:
        raise ValueError(f"expected [rows, {basis.shape[0]}] weights, got {tuple(weights.shape)}")


def _work_dtype(basis: torch.Tensor) -> torch.dtype:
    # float64 where it is cheap and available; eigh has no half-precision kernels.
    return torch.float64 if basis.device.type == "cpu" else torch.float32


def naive_merge(basis: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`[rows, layers, hidden]`: `sum_c weights[:, c] * basis[c]`."""
    _check(basis, weights)
    flat = basis.reshape(basis.shape[0], -1)
    return (weights.to(basis.dtype) @ flat).reshape(weights.shape[0], *basis.shape[1:])


def orthogonal_merge(
    basis: torch.Tensor, weights: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE
) -> torch.Tensor:
    """`[rows, layers, hidden]`: shared components once (see the module docstring).

    Raises:
        ValueError: bad shapes, or `tolerance` outside (0, 1].
    """
    _check(basis, weights)
    if not 0.0 < tolerance <= 1.0:
        raise ValueError("tolerance must be in (0, 1]")
    work = _work_dtype(basis)
    vectors = basis.to(work).transpose(0, 1)  # [layers, categories, hidden]
    norms = vectors.norm(dim=-1)  # [layers, categories]
    units = vectors / norms.clamp(min=torch.finfo(work).tiny)[..., None]
    gram = units @ units.transpose(1, 2)  # [layers, C, C]
    w = weights.to(device=basis.device, dtype=work)[:, None, :]  # [rows, 1, C]
    active = ((w != 0) & (norms[None] > 0)).to(work)  # [rows, layers, C]
    demand = w * norms[None] * active  # [rows, layers, C]
    masked = gram[None] * active[..., :, None] * active[..., None, :]  # [rows, layers, C, C]
    eigenvalues, eigenvectors = torch.linalg.eigh(masked)
    inverse = 1.0 / eigenvalues.clamp(min=tolerance)
    along = (eigenvectors.transpose(-1, -2) @ demand[..., None]).squeeze(-1)  # Q^T d
    coefficients = (eigenvectors @ (inverse * along)[..., None]).squeeze(-1) * active
    merged = torch.einsum("rlc,lch->rlh", coefficients, units)
    return merged.to(basis.dtype)


def ties_merge(
    basis: torch.Tensor, weights: torch.Tensor, density: float = DEFAULT_DENSITY
) -> torch.Tensor:
    """`[rows, layers, hidden]`: sign-consensus disjoint mean (see the module docstring).

    Raises:
        ValueError: bad shapes, or `density` outside (0, 1].
    """
    _check(basis, weights)
    if not 0.0 < density <= 1.0:
        raise ValueError("density must be in (0, 1]")
    # Elementwise only: the basis' precision (at least fp32) is enough.
    work = torch.promote_types(basis.dtype, torch.float32)
    vectors = basis.to(work)
    if density < 1.0:
        hidden = vectors.shape[-1]
        keep = max(1, round(density * hidden))
        threshold = vectors.abs().topk(keep, dim=-1).values[..., -1:]
        vectors = torch.where(vectors.abs() >= threshold, vectors, torch.zeros_like(vectors))
    w = weights.to(device=basis.device, dtype=work)
    contributions = w[:, :, None, None] * vectors[None]  # [rows, C, layers, hidden]
    elected = contributions.sum(dim=1, keepdim=True).sign()
    agree = (contributions.sign() == elected) & (contributions != 0)
    kept = (contributions * agree).sum(dim=1)
    count = agree.sum(dim=1).clamp(min=1)
    return (kept / count).to(basis.dtype)


def merge(
    basis: torch.Tensor,
    weights: torch.Tensor,
    scheme: str = "naive",
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    density: float = DEFAULT_DENSITY,
) -> torch.Tensor:
    """Rows of category `weights [rows, C]` combined over `basis [C, layers, hidden]`.

    Raises:
        ValueError: an unknown scheme, bad shapes or parameters.
    """
    if scheme == "naive":
        return naive_merge(basis, weights)
    if scheme == "orthogonal":
        return orthogonal_merge(basis, weights, tolerance)
    if scheme == "ties":
        return ties_merge(basis, weights, density)
    raise ValueError(f"unknown merge scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def merge_scheme(requested: str | None, adapter: SafetyAdapter | None) -> str:
    """The scheme to steer with: `requested` when given, else the one the adapter's recipe
    says its coefficients were calibrated for (`recipe["merge"]`), else `naive`."""
    if requested is not None:
        return requested
    recipe_merge = adapter.metadata.recipe.get("merge") if adapter is not None else None
    return recipe_merge if isinstance(recipe_merge, str) and recipe_merge in SCHEMES else "naive"


@dataclass(frozen=True, eq=False)
class MergingBasis(SteeringBasis):
    """A `SteeringBasis` whose `table` combines a row's categories under a merge scheme.

    Drop-in wherever a `SteeringBasis` is used (hooks, engine, evaluation); `naive` gives
    exactly `SteeringBasis.table`.
    """

    scheme: str = "naive"
    tolerance: float = DEFAULT_TOLERANCE
    density: float = DEFAULT_DENSITY

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown merge scheme {self.scheme!r}; known: {', '.join(SCHEMES)}")

    @classmethod
    def of(
        cls,
        basis: SteeringBasis,
        scheme: str,
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        density: float = DEFAULT_DENSITY,
    ) -> MergingBasis:
        """`basis` with `scheme` for its tables."""
        return cls(
            basis.categories,
            basis.layers,
            basis.basis,
            basis.default_weights,
            scheme=scheme,
            tolerance=tolerance,
            density=density,
        )

    def table(self, row_weights: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The `[rows, layers, hidden]` steering table for rows of category weights."""
        if self.scheme == "naive":
            return super().table(row_weights)
        weights = (
            row_weights if isinstance(row_weights, torch.Tensor) else torch.stack(list(row_weights))
        )
        return merge(
            self.basis,
            weights.to(self.basis.device),
            self.scheme,
            tolerance=self.tolerance,
            density=self.density,
        )


# ----- the comparison table ---------------------------------------------------------------------
def cosine_matrix(basis: torch.Tensor) -> torch.Tensor:
    """`[layers, C, C]` pairwise cosine similarities of the category vectors at each layer."""
    vectors = basis.double().transpose(0, 1)
    units = vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    cosines: torch.Tensor = (units @ units.transpose(1, 2)).to(basis.dtype)
    return cosines


def mix_ratios(
    base: SteeringBasis,
    on: Sequence[str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    density: float = DEFAULT_DENSITY,
) -> dict[str, list[float]]:
    """Per scheme, per layer: `|mix| / mean |one category|`, the categories `on` at weight 1."""
    weights = base.weights({c: 1.0 if c in on else 0.0 for c in base.categories}, 1.0)
    rows = [base.categories.index(c) for c in on]
    one = base.basis[rows].norm(dim=-1).mean(dim=0)  # [layers]
    ratios: dict[str, list[float]] = {}
    for scheme in SCHEMES:
        mix = merge(base.basis, weights[None], scheme, tolerance=tolerance, density=density)[0]
        ratios[scheme] = [
            float(n / d) if float(d) > 0 else 0.0
            for n, d in zip(mix.norm(dim=-1), one, strict=True)
        ]
    return ratios


def _extreme_pairs(cosines: torch.Tensor, names: Sequence[str]) -> list[tuple[str, str, float]]:
    """The most and the least similar pair by cosine averaged over layers."""
    mean = cosines.double().mean(dim=0)
    count = len(names)
    pairs = [(mean[i, j].item(), i, j) for i in range(count) for j in range(i + 1, count)]
    if not pairs:
        return []
    chosen = [max(pairs), min(pairs)] if len(pairs) > 1 else pairs
    return [(names[i], names[j], value) for value, i, j in chosen]


def comparison_report(
    adapter: SafetyAdapter,
    categories: Sequence[str] | None = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    density: float = DEFAULT_DENSITY,
) -> str:
    """Per layer: `|mix| / |one category|` under each scheme, and the pairwise cosines.

    The mix turns `categories` (default: all) on at weight 1, the others off; the most and
    the least similar pair of them are shown too.

    Raises:
        UnknownCategory: a category the adapter does not have.
    """
    base = SteeringBasis.from_adapter(adapter)
    chosen = list(base.categories) if categories is None else list(categories)
    for name in chosen:
        base.weights({name: 1.0})  # raises UnknownCategory
    options = {"tolerance": tolerance, "density": density}
    cosines = cosine_matrix(base.basis[[base.categories.index(c) for c in chosen]])
    mixes: list[tuple[str, Sequence[str]]] = [(f"all {len(chosen)} on", chosen)]
    for first, second, value in _extreme_pairs(cosines, chosen):
        mixes.append((f"{first}+{second} (cos {value:.2f})", (first, second)))
    lines = [
        f"adapter {adapter.id} (orthogonal tolerance {tolerance:g}, ties density {density:g})",
        "|mix| / |one category|: norm of the combined vector over the mean norm of one "
        "category's coefficient*vector, categories on at weight 1",
        f"{'mix':<36}{'layer':>5} " + " ".join(f"{s:>10}" for s in SCHEMES),
    ]
    for label, on in mixes:
        ratios = mix_ratios(base, on, **options)
        for slot, layer in enumerate(base.layers):
            cells = " ".join(f"{ratios[s][slot]:>10.2f}" for s in SCHEMES)
            lines.append(f"{label if slot == 0 else '':<36}{layer:>5} {cells}")
    lines.append(
        f"{'layer':>5} {'|one|':>8} {'mean cos':>9} {'min cos':>8} {'max cos':>8} {'lam1/C':>7}"
        "   (lam1/C: top eigenvalue of the cosine matrix / C; 1 = all one direction)"
    )
    off_diagonal = ~torch.eye(len(chosen), dtype=torch.bool)
    rows = [base.categories.index(c) for c in chosen]
    for slot, layer in enumerate(base.layers):
        one = float(base.basis[rows, slot].norm(dim=-1).mean())
        cos = cosines[slot]
        others = cos[off_diagonal] if len(chosen) > 1 else torch.ones(1)
        share = float(torch.linalg.eigvalsh(cos.double())[-1]) / len(chosen)
        lines.append(
            f"{layer:>5} {one:>8.3f} {float(others.mean()):>9.3f} {float(others.min()):>8.3f} "
            f"{float(others.max()):>8.3f} {share:>7.3f}"
        )
    for slot, layer in enumerate(base.layers):
        lines.append(f"pairwise cosine similarity, layer {layer}")
        lines.append(" " * 15 + " ".join(f"{c[:6]:>6}" for c in chosen))
        for i, name in enumerate(chosen):
            row = " ".join(f"{float(cosines[slot, i, j]):>6.2f}" for j in range(len(chosen)))
            lines.append(f"{name:<15}{row}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print `comparison_report` for an adapter file."""
    parser = argparse.ArgumentParser(
        prog="python -m safesteer.adapters.merging",
        description="Compare merge schemes on an adapter: pairwise cosines of the category "
        "vectors and the norm of the all-categories mix under naive, orthogonal and ties.",
    )
    parser.add_argument("--adapter", required=True, help="adapter .safetensors file")
    parser.add_argument(
        "--categories",
        default=None,
        help="comma-separated categories turned on (default: all of the adapter's)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"orthogonal: eigenvalue floor of the cosine matrix (default {DEFAULT_TOLERANCE})",
    )
    parser.add_argument(
        "--density",
        type=float,
        default=DEFAULT_DENSITY,
        help=f"ties: share of coordinates each category keeps (default {DEFAULT_DENSITY})",
    )
    args = parser.parse_args(argv)
    categories = None
    if args.categories:
        categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    try:
        adapter = SafetyAdapter.load(args.adapter)
        print(
            comparison_report(adapter, categories, tolerance=args.tolerance, density=args.density)
        )
    except (AdapterError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
