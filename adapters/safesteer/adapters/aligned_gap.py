"""Method `aligned-gap` (SafeGene): safety vectors from an aligned model and a degraded one.

Given an aligned model `A` and a fine-tune `D` of it whose safety has eroded (same family:
same architecture, width and depth, and the same tokenizer), the vector of harm category `c`
at decoder layer `l` is

    mean over c's harmful prompts p of  pooled_l(A, p) - pooled_l(D, p)

where `pooled_l(M, p)` is what decoder layer `l` of `M` outputs for the chat prompt of `p`
(one user turn, generation prompt appended, as the engine prefills it; the adapter convention
`decoder-output-0`), pooled over the prompt: what `D` lost on the category's harmful prompts,
layer by layer. Added to `D`'s residual stream, it moves `D` back toward `A` where it matters.

Pooling: `last` (default) reads the last prompt token, the end of the generation prompt,
which is where the model decides how to answer (refuse or comply) and the same template token
for every prompt, so the gap there is the decision's gap and not the prompt's wording; `mean`
averages over the prompt's tokens (without the attention sink, see `gating.pool`), which
also catches how the two models read the request's content. `--pooling` picks one.

Optional benign baseline: a fine-tune also moves activations on harmless prompts (its task's
drift); with `benign_baseline`, the mean gap on the benign fit prompts is subtracted, keeping
what changed on harmful prompts *more* than on benign ones.

Data: the harmful prompts of the **fit** split (`splits.py`), sampled per category by seed up
to a cap; with the baseline, the benign fit prompts likewise. Coefficients follow extract.py's
rule (the default mix adds `scale * typical_norm[l]`), `typical_norm[l]` being the mean norm of
layer l's output at the last prompt token over both models' harmful prompts. The adapter is
for the degraded model and the fine-tunes like it: `base_fingerprint` and `recipe.model` are
`D`'s; the recipe records both models' sources and fingerprints.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from safesteer.adapters.adapter import POOLINGS, SafetyAdapter
from safesteer.adapters.categories import CATEGORIES
from safesteer.adapters.extract import (
    CategoryDirections,
    category_adapter,
    chat_prompt_ids,
    norm_recipe,
    package_version,
    scaled_vectors,
)
from safesteer.adapters.gating import prompt_activations
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.prompts import SOURCE_LICENSES, HarmfulPrompt
from safesteer.adapters.splits import DEFAULT_SEED, BenignPrompt, benign_split, harmful_split

METHOD = "aligned-gap"
GAP_METHODS: tuple[str, ...] = (METHOD,)
DESCRIPTION = (
    "per category, per layer: mean over the category's harmful prompts (fit split) of the "
    "aligned model's pooled prompt activation minus the degraded model's"
)
_T = TypeVar("_T")


@dataclass(frozen=True)
class GapConfig:
    """What to extract and how; every field ends up in the adapter's recipe."""

    layers: tuple[int, ...]
    scale: float
    seed: int = 0
    categories: tuple[str, ...] = tuple(CATEGORIES)
    max_prompts_per_category: int | None = 24
    pooling: str = "last"
    benign_baseline: bool = False
    max_benign_prompts: int | None = None
    split_seed: int = DEFAULT_SEED
    batch_size: int = 16
    name: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; known: {', '.join(POOLINGS)}")
        if not self.layers or min(self.layers) < 0:
            raise ValueError("choose at least one layer, none negative")
        if self.scale <= 0:
            raise ValueError("scale must be positive")
        unknown = [c for c in self.categories if c not in CATEGORIES]
        if unknown or not self.categories:
            raise ValueError(f"unknown categories {unknown}; known: {', '.join(CATEGORIES)}")
        caps = (self.max_prompts_per_category, self.max_benign_prompts)
        if self.batch_size < 1 or any(cap is not None and cap < 1 for cap in caps):
            raise ValueError("caps and batch size must be positive")


@dataclass(frozen=True)
class GapDirections:
    """Per-category gap directions and the prompts they came from."""

    directions: CategoryDirections
    harmful: tuple[HarmfulPrompt, ...]
    benign: tuple[BenignPrompt, ...]  # empty without the benign baseline
    pooling: str
    data_origin: str

    def rows(self, category: str) -> list[int]:
        return [i for i, prompt in enumerate(self.harmful) if prompt.category == category]


@dataclass(frozen=True)
class GapExtractionResult:
    """The adapter, the directions it was built from, and the wall time of the extraction."""

    adapter: SafetyAdapter
    extraction: GapDirections
    seconds: float


def check_model_pair(aligned: LoadedModel, degraded: LoadedModel) -> None:
    """Refuse a pair whose activation gap means nothing.

    Raises:
        ValueError: the models are of different families, or have the same weights.
    """
    if aligned.family.id != degraded.family.id:
        raise ValueError(
            f"the aligned model {aligned.name} (family {aligned.family.id}) and the degraded "
            f"model {degraded.name} (family {degraded.family.id}) are not one family: "
            "aligned-gap needs a fine-tune of the aligned model (same architecture, hidden "
            "size and layer count)"
        )
    if aligned.fingerprint == degraded.fingerprint:
        raise ValueError(
            f"the aligned model {aligned.name} and the degraded model {degraded.name} have "
            f"the same weights (fingerprint {aligned.fingerprint[:16]}): there is no gap"
        )


def _check_tokenizers(aligned: LoadedModel, degraded: LoadedModel, prompts: Sequence[str]) -> None:
    for prompt in prompts:
        if chat_prompt_ids(aligned.tokenizer, prompt) != chat_prompt_ids(
            degraded.tokenizer, prompt
        ):
            raise ValueError(
                f"{aligned.name} and {degraded.name} tokenize the prompt {prompt[:40]!r} "
                "differently (tokenizer or chat template): their activations do not line up"
            )


def _sample(items: Sequence[_T], cap: int | None, rng: random.Random) -> list[_T]:
    shuffled = list(items)
    rng.shuffle(shuffled)
    return shuffled if cap is None else shuffled[:cap]


def select_gap_prompts(
    harmful: Sequence[HarmfulPrompt], config: GapConfig
) -> tuple[HarmfulPrompt, ...]:
    """Up to the cap of each category's harmful prompts, in a seeded order.

    Raises:
        ValueError: a category of `config` has no harmful prompt.
    """
    rng = random.Random(config.seed)
    chosen: list[HarmfulPrompt] = []
    for category in config.categories:
        pool = [p for p in harmful if p.category == category]
        if not pool:
            raise ValueError(f"no harmful prompts for category {category!r}")
        chosen.extend(_sample(pool, config.max_prompts_per_category, rng))
    return tuple(chosen)


def extract_gap_directions(
    aligned: LoadedModel,
    degraded: LoadedModel,
    config: GapConfig,
    harmful: Sequence[HarmfulPrompt] | None = None,
    benign: Sequence[BenignPrompt] | None = None,
    through_layer: int | None = None,
) -> GapDirections:
    """Pool both models' activations on the fit-split prompts (or those given); the gaps.

    Directions cover layers `0 .. through_layer`, by default the config's highest layer.

    Raises:
        ValueError: the pair is refused (`check_model_pair`), the tokenizers differ, or a
            layer is outside the model.
    """
    check_model_pair(aligned, degraded)
    torch.manual_seed(config.seed)
    origin = "given" if harmful is not None else f"fit split, split seed {config.split_seed}"
    harmful = harmful if harmful is not None else harmful_split("fit", config.split_seed)
    chosen = select_gap_prompts(harmful, config)
    chosen_benign: tuple[BenignPrompt, ...] = ()
    if config.benign_baseline:
        pool = benign if benign is not None else benign_split("fit", seed=config.split_seed)
        chosen_benign = tuple(
            _sample(pool, config.max_benign_prompts, random.Random(f"{config.seed}:benign"))
        )
        if not chosen_benign:
            raise ValueError("the benign baseline needs benign prompts")
    last = max(config.layers) if through_layer is None else through_layer
    if not 0 <= last < degraded.family.num_layers:
        raise ValueError(f"layer {last} outside 0..{degraded.family.num_layers - 1}")
    texts = [p.prompt for p in chosen]
    benign_texts = [p.prompt for p in chosen_benign]
    _check_tokenizers(aligned, degraded, [*texts, *benign_texts])
    options: dict[str, Any] = {
        "layers": list(range(last + 1)),
        "batch_size": config.batch_size,
        "show_progress": config.show_progress,
    }
    pooled: dict[str, dict[str, torch.Tensor]] = {}
    for label, model in (("aligned", aligned), ("degraded", degraded)):
        pooled[label] = prompt_activations(
            model.model, model.tokenizer, texts, desc=f"{label} model, harmful", **options
        )
        if benign_texts:
            benign_acts = prompt_activations(
                model.model, model.tokenizer, benign_texts, desc=f"{label} model, benign", **options
            )
            pooled[f"{label}_benign"] = benign_acts
    # float64: hundreds of rows of norm ~100 lose digits in an fp32 mean.
    gaps = (pooled["aligned"][config.pooling] - pooled["degraded"][config.pooling]).double()
    baseline = torch.zeros_like(gaps[0])
    if benign_texts:
        baseline = (
            (pooled["aligned_benign"][config.pooling] - pooled["degraded_benign"][config.pooling])
            .double()
            .mean(dim=0)
        )
    vectors = []
    for category in config.categories:
        rows = [i for i, prompt in enumerate(chosen) if prompt.category == category]
        vectors.append((gaps[rows].mean(dim=0) - baseline).float())
    last_token = torch.cat([pooled["aligned"]["last"], pooled["degraded"]["last"]])
    typical = last_token.norm(dim=-1).mean(dim=0)
    directions = CategoryDirections(tuple(config.categories), torch.stack(vectors), typical, ())
    return GapDirections(directions, chosen, chosen_benign, config.pooling, origin)


# ----- the adapter ------------------------------------------------------------------------------


def _model_record(loaded: LoadedModel) -> dict[str, str]:
    return {
        "name": loaded.name,
        "source": loaded.source,
        "fingerprint": loaded.fingerprint,
        "family_alias": loaded.family.alias,
    }


def _data_recipe(extraction: GapDirections) -> dict[str, Any]:
    per_category: dict[str, dict[str, Any]] = {}
    for category in extraction.directions.categories:
        rows = extraction.rows(category)
        by_source: dict[str, int] = {}
        for i in rows:
            source = extraction.harmful[i].source
            by_source[source] = by_source.get(source, 0) + 1
        per_category[category] = {
            "prompts": len(rows),
            "by_source": by_source,
            "ids": [extraction.harmful[i].id for i in rows],
        }
    used = sorted({p.source for p in extraction.harmful})
    benign = extraction.benign
    return {
        "origin": extraction.data_origin,
        "sources": {source: SOURCE_LICENSES.get(source, "not vendored") for source in used},
        "per_category": per_category,
        "benign_baseline": (
            {"prompts": len(benign), "edgy": sum(p.edgy for p in benign)} if benign else None
        ),
        "mapping": "safesteer/adapters/data/category_map.json",
    }


def build_gap_adapter(
    aligned: LoadedModel,
    degraded: LoadedModel,
    extraction: GapDirections,
    config: GapConfig,
    layers: Sequence[int] | None = None,
    scale: float | None = None,
) -> SafetyAdapter:
    """The adapter for `layers` at `scale` (default: the config's) from the gap directions.

    Raises:
        ValueError: a layer has no direction, or a direction is zero.
    """
    directions = extraction.directions
    layers = tuple(sorted(layers if layers is not None else config.layers))
    scale = scale if scale is not None else config.scale
    coefficients, vectors = scaled_vectors(directions, layers, scale)
    gap_norms = directions.vectors.norm(dim=-1).mean(dim=0)  # [layers]
    recipe: dict[str, Any] = {
        "method": METHOD,
        "description": DESCRIPTION
        + ("; minus the same gap on benign prompts" if extraction.benign else ""),
        "pooling": extraction.pooling,
        # The model the adapter steers and whose operating point its scale sets.
        "model": {
            "name": degraded.name,
            "source": degraded.source,
            "family_alias": degraded.family.alias,
        },
        "aligned": _model_record(aligned),
        "degraded": _model_record(degraded),
        "layers": list(layers),
        "scale": scale,
        "seed": config.seed,
        "split": {"name": "fit", "seed": config.split_seed},
        "max_prompts_per_category": config.max_prompts_per_category,
        "benign_baseline": config.benign_baseline,
        "max_benign_prompts": config.max_benign_prompts,
        "chat_template": "tokenizer's own, add_generation_prompt=True, one user turn",
        "coefficient_rule": (
            "coef[c][l] = scale * typical_norm[l] / (mix_norm_ratio[l] * |vector[c][l]|): "
            "the default mix (all categories at weight 1) adds scale * typical_norm[l]; "
            "typical_norm[l] = mean norm of layer l's output at the last prompt token over "
            "both models"
        ),
        **norm_recipe(directions, layers),
        "gap_norm_from_layer_0": [round(float(n), 3) for n in gap_norms],
        "data": _data_recipe(extraction),
        "safesteer_version": package_version(),
    }
    name = config.name or f"{degraded.family.alias}-safety-{METHOD}"
    return category_adapter(name, degraded, vectors, coefficients, recipe)


def extract_gap_adapter(
    aligned: LoadedModel,
    degraded: LoadedModel,
    config: GapConfig,
    harmful: Sequence[HarmfulPrompt] | None = None,
    benign: Sequence[BenignPrompt] | None = None,
) -> GapExtractionResult:
    """Extract the gap directions from the fit split (or the prompts given); the adapter."""
    started = time.perf_counter()
    extraction = extract_gap_directions(aligned, degraded, config, harmful, benign)
    adapter = build_gap_adapter(aligned, degraded, extraction, config)
    return GapExtractionResult(adapter, extraction, time.perf_counter() - started)
