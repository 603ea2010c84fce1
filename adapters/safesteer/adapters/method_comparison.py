"""Compare the extraction methods on a model: direction agreement and a tiny refusal probe.

`python -m safesteer.adapters.method_comparison --adapter adapters/smollm2-135m/safety.safetensors`

- Contrastive directions are read from an adapter extracted with `--method contrastive` (the
  built-in one by default), so the expensive generation and teacher forcing are not redone.
- diffmean and pca are extracted here from a small seeded sample of the fit split, with both
  poolings (`last`, `mean`) from one set of forward passes.
- Per steered layer it prints, per category, the cosine similarity between the methods, and
  per method the mean cosine between *different* categories (how much the categories share).
- The probe answers the project's 12 harmful + 12 benign probe prompts greedily with the
  default mix (all categories at weight 1, naive sum) of each method at one layer and scale
  and counts refusals with the keyword judge: a quick check, not an evaluation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import AdapterError, ModelLoadError
from safesteer.adapters.extract import (
    CategoryDirections,
    ExtractionConfig,
    build_adapter,
    probe_adapter,
)
from safesteer.adapters.extract_prompt import (
    PromptDirections,
    PromptExtractionConfig,
    build_prompt_adapter,
    directions_from_activations,
    select_prompt_sets,
)
from safesteer.adapters.gating import prompt_activations
from safesteer.adapters.loading import DEFAULT_MODEL, LoadedModel, load_model
from safesteer.adapters.prompts import load_probe_prompts
from safesteer.adapters.splits import benign_split, harmful_split


def contrastive_from_adapter(adapter: SafetyAdapter) -> CategoryDirections:
    """The adapter's raw vectors as directions for layers `0 .. max layer` (others zero).

    Typical norms come from the recipe (`typical_norm_from_layer_0`, written by contrastive
    extraction) so that adapters rebuilt from them follow the same coefficient rule.

    Raises:
        ValueError: the recipe has no per-layer typical norms.
    """
    typical = adapter.metadata.recipe.get("typical_norm_from_layer_0")
    if not isinstance(typical, list):
        raise ValueError("the adapter's recipe has no typical_norm_from_layer_0")
    layers = max(adapter.layers) + 1
    vectors = torch.zeros(len(adapter.categories), layers, adapter.metadata.hidden_size)
    for row, category in enumerate(adapter.categories):
        for layer, vector in adapter.vectors[category].items():
            vectors[row, layer] = vector
    norms = torch.tensor([float(n) for n in typical[:layers]])
    return CategoryDirections(tuple(adapter.categories), vectors, norms, ())


def prompt_side_directions(
    loaded: LoadedModel, config: PromptExtractionConfig, through_layer: int
) -> dict[str, PromptDirections]:
    """diffmean and pca with each pooling, named `method/pooling`, from one forward pass each."""
    sets = select_prompt_sets(harmful_split("fit"), benign_split("fit"), config)
    options: dict[str, Any] = {
        "layers": list(range(through_layer + 1)),
        "batch_size": config.batch_size,
        "show_progress": config.show_progress,
    }
    harmful = prompt_activations(
        loaded.model, loaded.tokenizer, [p.prompt for p in sets.harmful], **options
    )
    benign = prompt_activations(
        loaded.model, loaded.tokenizer, [p.prompt for p in sets.benign], **options
    )
    typical = torch.cat([harmful["last"], benign["last"]]).norm(dim=-1).mean(dim=0)
    result: dict[str, PromptDirections] = {}
    for method in ("diffmean", "pca"):
        for pooling in ("last", "mean"):
            vectors = directions_from_activations(method, harmful[pooling], benign[pooling], sets)
            directions = CategoryDirections(tuple(config.categories), vectors, typical, ())
            result[f"{method}/{pooling}"] = PromptDirections(
                method, pooling, directions, sets, "fit split sample"
            )
    return result


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.cosine_similarity(a.double(), b.double(), dim=0))


def _cross_category(vectors: torch.Tensor) -> float:
    units = torch.nn.functional.normalize(vectors.double(), dim=-1)
    cosines = units @ units.T
    count = cosines.shape[0]
    return float((cosines.sum() - count) / (count * (count - 1)))


def agreement_report(
    contrastive: CategoryDirections,
    prompt_side: dict[str, PromptDirections],
    layers: Sequence[int],
) -> str:
    """Per layer and category: cosines between the methods; per method: cross-category cosine."""
    vectors = {"contrastive": contrastive.vectors}
    vectors.update({name: d.directions.vectors for name, d in prompt_side.items()})
    pairs = [
        ("contrastive", "diffmean/last"),
        ("contrastive", "pca/last"),
        ("diffmean/last", "pca/last"),
        ("contrastive", "diffmean/mean"),
        ("contrastive", "pca/mean"),
        ("diffmean/mean", "pca/mean"),
        ("diffmean/last", "diffmean/mean"),
    ]
    short = {
        "contrastive": "C",
        "diffmean/last": "D",
        "pca/last": "P",
        "diffmean/mean": "Dm",
        "pca/mean": "Pm",
    }
    header = f"{'category':<15}" + "".join(f"{short[a] + '~' + short[b]:>8}" for a, b in pairs)
    lines = [
        "cosine similarity between methods (C contrastive, D diffmean, P pca; pooling last, "
        "Dm/Pm: mean pooling)"
    ]
    for layer in layers:
        lines.append(f"layer {layer}")
        lines.append(header)
        for row, category in enumerate(contrastive.categories):
            cells = "".join(
                f"{_cosine(vectors[a][row, layer], vectors[b][row, layer]):>8.2f}" for a, b in pairs
            )
            lines.append(f"{category:<15}{cells}")
        cross = "  ".join(
            f"{name} {_cross_category(v[:, layer]):.2f}" for name, v in vectors.items()
        )
        lines.append(f"mean cosine between different categories: {cross}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the agreement table and, unless `--no-probe`, the probe of each method."""
    parser = argparse.ArgumentParser(
        prog="python -m safesteer.adapters.method_comparison",
        description="Compare contrastive (from an adapter), diffmean and pca directions.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model to extract from")
    parser.add_argument(
        "--adapter", required=True, help="adapter made by contrastive extraction on that model"
    )
    parser.add_argument("--max-prompts-per-category", type=int, default=8, help="harmful cap")
    parser.add_argument("--max-benign-prompts", type=int, default=40, help="benign cap")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--probe-layer", type=int, default=15, help="the probe's one layer")
    parser.add_argument("--probe-scale", type=float, default=0.2, help="the probe's scale")
    parser.add_argument("--probe-tokens", type=int, default=32, help="new tokens per answer")
    parser.add_argument("--no-probe", action="store_true", help="only the agreement table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        reference = SafetyAdapter.load(args.adapter)
        contrastive = contrastive_from_adapter(reference)
        loaded = load_model(args.model)
        reference.check_fits(loaded.family)
    except (AdapterError, ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layers = reference.layers
    through = max([*layers, args.probe_layer])
    config = PromptExtractionConfig(
        method="diffmean",
        layers=(args.probe_layer,),
        scale=args.probe_scale,
        seed=args.seed,
        categories=tuple(reference.categories),
        max_prompts_per_category=args.max_prompts_per_category,
        max_benign_prompts=args.max_benign_prompts,
        show_progress=not args.quiet,
    )
    prompt_side = prompt_side_directions(loaded, config, through)
    sets = next(iter(prompt_side.values())).sets
    print(
        f"diffmean/pca from {len(sets.harmful)} harmful + {len(sets.benign)} benign fit-split "
        f"prompts (seed {args.seed}); contrastive from {reference.id}"
    )
    print(agreement_report(contrastive, prompt_side, layers))
    if args.no_probe:
        return 0
    if args.probe_layer not in layers:
        print(f"no probe: the adapter has no contrastive vector at layer {args.probe_layer}")
        return 0
    probe = load_probe_prompts()
    setting = ((args.probe_layer,), args.probe_scale)
    contrastive_config = ExtractionConfig(layers=setting[0], scale=setting[1], show_progress=False)
    adapters: dict[str, SafetyAdapter | None] = {
        "no steering": None,
        "contrastive": build_adapter(loaded, contrastive, contrastive_config),
    }
    for name in ("diffmean/last", "pca/last"):
        extraction = prompt_side[name]
        method_config = PromptExtractionConfig(
            method=extraction.method, layers=setting[0], scale=setting[1]
        )
        adapters[name] = build_prompt_adapter(loaded, extraction, method_config)
    print(
        f"probe: layer {args.probe_layer} @ scale {args.probe_scale}, default mix (naive sum), "
        f"greedy, {args.probe_tokens} new tokens, keyword judge"
    )
    for label, adapter in adapters.items():
        report = probe_adapter(
            loaded,
            adapter,
            probe,
            label=label,
            max_new_tokens=args.probe_tokens,
            show_progress=not args.quiet,
        )
        print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
