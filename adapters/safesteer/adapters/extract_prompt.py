"""Prompt-side extraction: per harm category, a direction from pooled prompt activations.

The methods `diffmean` and `pca` need no answers, only forward passes over chat prompts (one
user turn, the generation prompt appended, as the engine prefills them), so they are much
cheaper than `contrastive` (extract.py), which generates and teacher-forces answers.

Data: the category's harmful prompts and the benign prompts of the **fit** split
(`splits.py`; dev and test are never read here), each sampled down to a cap by seed. Each
prompt's decoder-layer outputs are pooled (`last`: the last prompt token, where the answer
starts; `mean`: the mean over the prompt without the attention sink; see `gating.pool`).

- `diffmean` (diffmean.py): mean(harmful of the category) - mean(all benign), per layer.
- `pca` (principal.py): the first principal direction of the paired differences
  `harmful_i - partner_i`, sign-aligned with the diffmean direction and scaled to its norm. A
  harmful prompt's partner is a benign prompt of the same vocabulary where there is one (the
  edgy prompts tagged with the category), in a seeded order, reused round-robin; else any
  benign prompt.

Coefficients follow extract.py's rule: the default mix adds `scale * typical_norm[l]` at each
steered layer; here `typical_norm[l]` is the mean norm of layer l's output at the last prompt
token over all selected prompts (one token's norm, like the per-token norm contrastive uses).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from safesteer.adapters.adapter import POOLINGS, SafetyAdapter
from safesteer.adapters.aligned_gap import GAP_METHODS
from safesteer.adapters.categories import CATEGORIES
from safesteer.adapters.diffmean import difference_of_means
from safesteer.adapters.extract import METHODS as RESPONSE_METHODS
from safesteer.adapters.extract import (
    CategoryDirections,
    category_adapter,
    norm_recipe,
    package_version,
    scaled_vectors,
)
from safesteer.adapters.gating import prompt_activations
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.principal import principal_directions
from safesteer.adapters.prompts import SOURCE_LICENSES, HarmfulPrompt
from safesteer.adapters.splits import DEFAULT_SEED, BenignPrompt, benign_split, harmful_split

PROMPT_METHODS: tuple[str, ...] = ("diffmean", "pca")
_T = TypeVar("_T")
# Every method `safesteer extract --method` knows; contrastive lives in extract.py, aligned-gap
# (two models) in aligned_gap.py.
EXTRACTION_METHODS: tuple[str, ...] = (*RESPONSE_METHODS, *PROMPT_METHODS, *GAP_METHODS)
DESCRIPTIONS: Mapping[str, str] = {
    "diffmean": (
        "per category, per layer: mean pooled prompt activation of the category's harmful "
        "prompts minus that of the benign prompts (fit split)"
    ),
    "pca": (
        "per category, per layer: first principal direction (uncentered) of the differences "
        "harmful prompt - matched benign prompt (fit split), sign-aligned with and scaled to "
        "the diffmean direction"
    ),
}


@dataclass(frozen=True)
class PromptExtractionConfig:
    """What to extract and how; every field ends up in the adapter's recipe."""

    method: str
    layers: tuple[int, ...]
    scale: float
    seed: int = 0
    categories: tuple[str, ...] = tuple(CATEGORIES)
    max_prompts_per_category: int | None = None
    max_benign_prompts: int | None = None
    pooling: str = "last"
    split_seed: int = DEFAULT_SEED
    batch_size: int = 16
    name: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in PROMPT_METHODS:
            raise ValueError(
                f"unknown prompt-side method {self.method!r}; known: {', '.join(PROMPT_METHODS)}"
            )
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
class PromptSets:
    """The prompts an extraction reads: harmful ones by category, benign ones, and pairs."""

    harmful: tuple[HarmfulPrompt, ...]
    benign: tuple[BenignPrompt, ...]
    partners: tuple[int, ...]  # per harmful prompt, the index of its benign partner

    def rows(self, category: str) -> list[int]:
        """Indices of the category's harmful prompts."""
        return [i for i, prompt in enumerate(self.harmful) if prompt.category == category]


@dataclass(frozen=True)
class PromptDirections:
    """Per-category directions from prompt activations and the prompts they came from."""

    method: str
    pooling: str
    directions: CategoryDirections
    sets: PromptSets
    data_origin: str


@dataclass(frozen=True)
class PromptExtractionResult:
    """The adapter, the directions it was built from, and the wall time of the extraction."""

    adapter: SafetyAdapter
    extraction: PromptDirections
    seconds: float


# ----- prompt selection -------------------------------------------------------------------------
def _sample(items: Sequence[_T], cap: int | None, rng: random.Random) -> list[_T]:
    shuffled = list(items)
    rng.shuffle(shuffled)
    return shuffled if cap is None else shuffled[:cap]


def select_prompt_sets(
    harmful: Sequence[HarmfulPrompt],
    benign: Sequence[BenignPrompt],
    config: PromptExtractionConfig,
) -> PromptSets:
    """Seeded samples of the prompts (caps from `config`) and each harmful prompt's partner.

    Raises:
        ValueError: no benign prompt, or a category of `config` without harmful prompts.
    """
    rng = random.Random(config.seed)
    chosen_benign = _sample(benign, config.max_benign_prompts, rng)
    if not chosen_benign:
        raise ValueError("no benign prompts to contrast with")
    chosen: list[HarmfulPrompt] = []
    partners: list[int] = []
    for category in config.categories:
        pool = [p for p in harmful if p.category == category]
        if not pool:
            raise ValueError(f"no harmful prompts for category {category!r}")
        picked = _sample(pool, config.max_prompts_per_category, rng)
        matched = [i for i, p in enumerate(chosen_benign) if p.category == category]
        candidates = _sample(matched or range(len(chosen_benign)), None, rng)
        chosen.extend(picked)
        partners.extend(candidates[i % len(candidates)] for i in range(len(picked)))
    return PromptSets(tuple(chosen), tuple(chosen_benign), tuple(partners))


# ----- directions -------------------------------------------------------------------------------
def directions_from_activations(
    method: str, harmful: torch.Tensor, benign: torch.Tensor, sets: PromptSets
) -> torch.Tensor:
    """`[categories, layers, hidden]` in the order of `sets`' categories of first appearance.

    `harmful [n, layers, hidden]` and `benign [m, layers, hidden]` are the pooled activations
    of `sets.harmful` and `sets.benign`, row for row.
    """
    if method not in PROMPT_METHODS:
        raise ValueError(f"unknown prompt-side method {method!r}")
    categories = list(dict.fromkeys(p.category for p in sets.harmful))
    vectors = []
    for category in categories:
        rows = sets.rows(category)
        mean_difference = difference_of_means(harmful[rows], benign)
        if method == "diffmean":
            vectors.append(mean_difference)
            continue
        partners = torch.tensor([sets.partners[i] for i in rows])
        vectors.append(principal_directions(harmful[rows] - benign[partners], mean_difference))
    return torch.stack(vectors)


def extract_prompt_directions(
    loaded: LoadedModel,
    config: PromptExtractionConfig,
    harmful: Sequence[HarmfulPrompt] | None = None,
    benign: Sequence[BenignPrompt] | None = None,
    through_layer: int | None = None,
) -> PromptDirections:
    """Pool the fit-split prompts' activations (or those given) and compute the directions.

    Directions cover layers `0 .. through_layer`, by default the config's highest layer.
    """
    torch.manual_seed(config.seed)
    origin = "given"
    if harmful is None or benign is None:
        origin = f"fit split, split seed {config.split_seed}"
    harmful = harmful if harmful is not None else harmful_split("fit", config.split_seed)
    benign = benign if benign is not None else benign_split("fit", seed=config.split_seed)
    sets = select_prompt_sets(harmful, benign, config)
    last = max(config.layers) if through_layer is None else through_layer
    if not 0 <= last < loaded.family.num_layers:
        raise ValueError(f"layer {last} outside 0..{loaded.family.num_layers - 1}")
    options: dict[str, Any] = {
        "layers": list(range(last + 1)),
        "batch_size": config.batch_size,
        "show_progress": config.show_progress,
    }
    model, tokenizer = loaded.model, loaded.tokenizer
    harmful_acts = prompt_activations(
        model, tokenizer, [p.prompt for p in sets.harmful], desc="harmful prompts", **options
    )
    benign_acts = prompt_activations(
        model, tokenizer, [p.prompt for p in sets.benign], desc="benign prompts", **options
    )
    vectors = directions_from_activations(
        config.method, harmful_acts[config.pooling], benign_acts[config.pooling], sets
    )
    last_token = torch.cat([harmful_acts["last"], benign_acts["last"]])
    typical = last_token.norm(dim=-1).mean(dim=0)
    directions = CategoryDirections(tuple(config.categories), vectors, typical, ())
    return PromptDirections(config.method, config.pooling, directions, sets, origin)


# ----- the adapter ------------------------------------------------------------------------------


def _data_recipe(extraction: PromptDirections) -> dict[str, Any]:
    sets = extraction.sets
    per_category: dict[str, dict[str, Any]] = {}
    for category in extraction.directions.categories:
        rows = sets.rows(category)
        by_source: dict[str, int] = {}
        for i in rows:
            source = sets.harmful[i].source
            by_source[source] = by_source.get(source, 0) + 1
        matched = sum(sets.benign[sets.partners[i]].category == category for i in rows)
        per_category[category] = {
            "prompts": len(rows),
            "by_source": by_source,
            "matched_partners": matched,
        }
    used = sorted({p.source for p in sets.harmful})
    edgy = sum(p.edgy for p in sets.benign)
    return {
        "origin": extraction.data_origin,
        "sources": {source: SOURCE_LICENSES.get(source, "not vendored") for source in used},
        "per_category": per_category,
        "benign": {"prompts": len(sets.benign), "edgy": edgy, "file": "benign_prompts.jsonl"},
        "mapping": "safesteer/adapters/data/category_map.json",
    }


def build_prompt_adapter(
    loaded: LoadedModel,
    extraction: PromptDirections,
    config: PromptExtractionConfig,
    layers: Sequence[int] | None = None,
    scale: float | None = None,
) -> SafetyAdapter:
    """The adapter for `layers` at `scale` (default: the config's) from extracted directions.

    Raises:
        ValueError: a layer has no direction, or a direction is zero.
    """
    directions = extraction.directions
    layers = tuple(sorted(layers if layers is not None else config.layers))
    scale = scale if scale is not None else config.scale
    coefficients, vectors = scaled_vectors(directions, layers, scale)
    recipe: dict[str, Any] = {
        "method": extraction.method,
        "description": DESCRIPTIONS[extraction.method],
        "pooling": extraction.pooling,
        "model": {
            "name": loaded.name,
            "source": loaded.source,
            "family_alias": loaded.family.alias,
        },
        "layers": list(layers),
        "scale": scale,
        "seed": config.seed,
        "split": {"name": "fit", "seed": config.split_seed},
        "max_prompts_per_category": config.max_prompts_per_category,
        "max_benign_prompts": config.max_benign_prompts,
        "chat_template": "tokenizer's own, add_generation_prompt=True, one user turn",
        "coefficient_rule": (
            "coef[c][l] = scale * typical_norm[l] / (mix_norm_ratio[l] * |vector[c][l]|): "
            "the default mix (all categories at weight 1) adds scale * typical_norm[l]; "
            "typical_norm[l] = mean norm of layer l's output at the last prompt token"
        ),
        **norm_recipe(directions, layers),
        "data": _data_recipe(extraction),
        "safesteer_version": package_version(),
    }
    name = config.name or f"{loaded.family.alias}-safety-{extraction.method}"
    return category_adapter(name, loaded, vectors, coefficients, recipe)


def extract_prompt_adapter(
    loaded: LoadedModel,
    config: PromptExtractionConfig,
    harmful: Sequence[HarmfulPrompt] | None = None,
    benign: Sequence[BenignPrompt] | None = None,
) -> PromptExtractionResult:
    """Extract directions from the fit split (or the prompts given) and build the adapter."""
    started = time.perf_counter()
    extraction = extract_prompt_directions(loaded, config, harmful, benign)
    adapter = build_prompt_adapter(loaded, extraction, config)
    return PromptExtractionResult(adapter, extraction, time.perf_counter() - started)
