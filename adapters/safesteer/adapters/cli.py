"""Toolkit subcommands of the `safesteer` command: `inspect`, `extract`, `export-gguf`,
`eval`, `build-adapter`, `calibrate`, `finetune`, `zoo-data`, `zoo`.

The server package adds `serve` on top (dependency direction: server -> adapters).
Each subcommand sets `func(args) -> int` (the exit status).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.aligned_gap import (
    GAP_METHODS,
    GapConfig,
    build_gap_adapter,
    extract_gap_directions,
)
from safesteer.adapters.categories import CATEGORIES
from safesteer.adapters.errors import AdapterError, ModelLoadError
from safesteer.adapters.extract import (
    CategoryDirections,
    ExtractionConfig,
    ProbeReport,
    build_adapter,
    extract_directions,
    mix_norm_ratio,
    probe_adapter,
)
from safesteer.adapters.extract_prompt import (
    EXTRACTION_METHODS,
    PROMPT_METHODS,
    PromptExtractionConfig,
    build_prompt_adapter,
    extract_prompt_directions,
)
from safesteer.adapters.gguf_export import ControlVectorExportError, export_control_vector
from safesteer.adapters.judge import is_refusal
from safesteer.adapters.loading import DEFAULT_MODEL, LoadedModel, load_model
from safesteer.adapters.prompts import load_probe_prompts

# The built-in adapter's setting (adapters/smollm2-135m/README.md has the probe behind it).
DEFAULT_LAYERS: tuple[int, ...] = (12, 15, 18)
DEFAULT_SCALE = 0.08


def _inspect(args: argparse.Namespace) -> int:
    try:
        adapter = SafetyAdapter.load(args.file)
    except AdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    header = adapter.to_header()
    if args.json:
        header["norms"] = adapter.norms()
        print(json.dumps(header, indent=2))
        return 0
    print(f"{'adapter':<17}{adapter.id}")
    for key in ("family", "architecture", "hidden_size", "num_layers", "layer_convention"):
        print(f"{key:<17}{header[key]}")
    print(f"{'sha256':<17}{adapter.payload_sha256}")
    print(f"{'fingerprint':<17}{header['base_fingerprint'] or '-'}")
    print(f"{'layers':<17}{', '.join(map(str, adapter.layers))}")
    print(f"{'categories':<17}(default weight, norm of coefficient*vector per layer)")
    norms = adapter.norms()
    for name, spec in adapter.metadata.categories.items():
        per_layer = " ".join(f"L{la}={n:.2f}" for la, n in sorted(norms.get(name, {}).items()))
        print(f"  {name:<15} w={spec.default_weight:<4g} {per_layer}")
        print(f"  {'':<15} {spec.description}")
    if adapter.conditions:
        print(f"{'conditions':<17}{', '.join(sorted(adapter.conditions))}")
    recipe: dict[str, Any] = dict(adapter.metadata.recipe)
    if recipe:
        print(f"{'recipe':<17}" + json.dumps(recipe, sort_keys=True)[:2000])
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _categories(text: str) -> tuple[str, ...]:
    if text == "all":
        return tuple(CATEGORIES)
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in CATEGORIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown categories {unknown}; known: {', '.join(CATEGORIES)}"
        )
    return names


def _probe_setting(text: str) -> tuple[tuple[int, ...], float]:
    layers, sep, scale = text.partition("@")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LAYERS@SCALE like 12,15,18@0.1, got {text!r}")
    try:
        return _int_list(layers), float(scale)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad scale in {text!r}") from exc


def _extraction_config(args: argparse.Namespace) -> ExtractionConfig:
    return ExtractionConfig(
        layers=args.layers,
        scale=args.scale,
        seed=args.seed,
        method=args.method,
        categories=args.categories,
        max_prompts_per_category=args.max_prompts_per_category or None,
        max_response_tokens=args.max_response_tokens,
        compliance_tokens=args.compliance_tokens,
        batch_size=args.batch_size,
        name=args.name,
        show_progress=not args.quiet,
    )


def _print_probe(report: ProbeReport, show_answers: bool) -> None:
    print(report.summary())
    if show_answers:
        for kind, answers in (
            ("harmful", report.harmful_answers),
            ("benign", report.benign_answers),
        ):
            for answer in answers:
                refused = "REFUSED" if is_refusal(answer) else "answered"
                print(f"    [{kind} {refused}] {' '.join(answer.split())[:160]}")


def _run_probe(
    loaded: LoadedModel,
    build: Callable[[tuple[int, ...], float], SafetyAdapter],
    settings: list[tuple[tuple[int, ...], float]],
    args: argparse.Namespace,
) -> None:
    probe = load_probe_prompts()
    options: dict[str, Any] = {
        "max_new_tokens": args.probe_tokens,
        "show_progress": not args.quiet,
    }
    print(
        f"probe: {len(probe.harmful)} harmful + {len(probe.benign)} benign project prompts, "
        f"greedy, {args.probe_tokens} new tokens, default mix (all categories at weight 1), "
        "keyword judge"
    )
    _print_probe(
        probe_adapter(loaded, None, probe, label="no steering", **options), args.show_answers
    )
    for layers, scale in settings:
        adapter = build(layers, scale)
        label = f"layers {','.join(map(str, sorted(layers)))} @ {scale:g}"
        _print_probe(
            probe_adapter(loaded, adapter, probe, label=label, **options), args.show_answers
        )


def _print_layers(directions: CategoryDirections, layers: Sequence[int], scale: float) -> None:
    for layer in layers:
        typical = float(directions.typical_norms[layer])
        agreement = mix_norm_ratio(directions, layer)
        print(
            f"layer {layer}: typical norm {typical:.1f}, default mix adds "
            f"{scale * typical:.1f}, |sum of category unit vectors| "
            f"{agreement:.2f} of {len(directions.categories)}"
        )


def _prompt_config(args: argparse.Namespace) -> PromptExtractionConfig:
    return PromptExtractionConfig(
        method=args.method,
        layers=args.layers,
        scale=args.scale,
        seed=args.seed,
        categories=args.categories,
        max_prompts_per_category=args.max_prompts_per_category or None,
        max_benign_prompts=args.max_benign_prompts or None,
        pooling=args.pooling,
        batch_size=args.batch_size,
        name=args.name,
        show_progress=not args.quiet,
    )


def _extract_prompt_side(args: argparse.Namespace) -> int:
    try:
        config = _prompt_config(args)
        settings = [(config.layers, config.scale), *args.probe_grid]
        loaded = load_model(args.model)
        started = time.perf_counter()
        through = max(layer for layers, _ in settings for layer in layers)
        extraction = extract_prompt_directions(loaded, config, through_layer=through)
        adapter = build_prompt_adapter(loaded, extraction, config)
        seconds = time.perf_counter() - started
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sets = extraction.sets
    print(
        f"extracted {adapter.id} ({config.method}, {config.pooling} pooling) in {seconds:.0f} s "
        f"from {len(sets.harmful)} harmful and {len(sets.benign)} benign fit-split prompts"
    )
    counts = {c: len(sets.rows(c)) for c in config.categories}
    print("prompts per category: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    _print_layers(extraction.directions, adapter.layers, config.scale)
    if args.out is not None:
        print(f"wrote {adapter.save(args.out)}")
    if args.probe:

        def build(layers: tuple[int, ...], scale: float) -> SafetyAdapter:
            return build_prompt_adapter(loaded, extraction, config, layers=layers, scale=scale)

        _run_probe(loaded, build, settings, args)
    return 0


def _gap_config(args: argparse.Namespace) -> GapConfig:
    return GapConfig(
        layers=args.layers,
        scale=args.scale,
        seed=args.seed,
        categories=args.categories,
        max_prompts_per_category=args.max_prompts_per_category or None,
        pooling=args.pooling,
        benign_baseline=args.benign_baseline,
        max_benign_prompts=args.max_benign_prompts or None,
        batch_size=args.batch_size,
        name=args.name,
        show_progress=not args.quiet,
    )


def _extract_aligned_gap(args: argparse.Namespace) -> int:
    if args.aligned is None or args.degraded is None:
        print(
            "error: --method aligned-gap needs --aligned MODEL and --degraded MODEL",
            file=sys.stderr,
        )
        return 2
    try:
        config = _gap_config(args)
        settings = [(config.layers, config.scale), *args.probe_grid]
        aligned = load_model(args.aligned)
        degraded = load_model(args.degraded)
        started = time.perf_counter()
        through = max(layer for layers, _ in settings for layer in layers)
        extraction = extract_gap_directions(aligned, degraded, config, through_layer=through)
        adapter = build_gap_adapter(aligned, degraded, extraction, config)
        seconds = time.perf_counter() - started
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    baseline = f" minus the gap on {len(extraction.benign)} benign" if extraction.benign else ""
    print(
        f"extracted {adapter.id} (aligned-gap, {config.pooling} pooling) in {seconds:.0f} s: "
        f"{aligned.name} minus {degraded.name} on {len(extraction.harmful)} harmful "
        f"fit-split prompts{baseline}"
    )
    counts = {c: len(extraction.rows(c)) for c in config.categories}
    print("prompts per category: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    _print_layers(extraction.directions, adapter.layers, config.scale)
    if args.out is not None:
        print(f"wrote {adapter.save(args.out)}")
    if args.probe:

        def build(layers: tuple[int, ...], scale: float) -> SafetyAdapter:
            return build_gap_adapter(
                aligned, degraded, extraction, config, layers=layers, scale=scale
            )

        print(f"probing the degraded model {degraded.name}")
        _run_probe(degraded, build, settings, args)
    return 0


def _extract(args: argparse.Namespace) -> int:
    if args.out is None and not args.probe:
        print("error: give --out FILE, --probe, or both", file=sys.stderr)
        return 2
    if args.method in GAP_METHODS:
        return _extract_aligned_gap(args)
    if args.aligned is not None or args.degraded is not None or args.benign_baseline:
        print(
            "error: --aligned, --degraded and --benign-baseline go with --method aligned-gap",
            file=sys.stderr,
        )
        return 2
    if args.method in PROMPT_METHODS:
        return _extract_prompt_side(args)
    try:
        config = _extraction_config(args)
        settings = [(config.layers, config.scale), *args.probe_grid]
        loaded = load_model(args.model)
        started = time.perf_counter()
        through = max(layer for layers, _ in settings for layer in layers)
        directions = extract_directions(loaded, config, through_layer=through)
        adapter = build_adapter(loaded, directions, config)
        seconds = time.perf_counter() - started
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = {
        c: len([p for p in directions.pairs if p.prompt.category == c]) for c in config.categories
    }
    print(f"extracted {adapter.id} in {seconds:.0f} s from {len(directions.pairs)} prompts")
    print("prompts per category: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    _print_layers(directions, adapter.layers, config.scale)
    if args.out is not None:
        path = adapter.save(args.out)
        print(f"wrote {path}")
    if args.probe:

        def build(layers: tuple[int, ...], scale: float) -> SafetyAdapter:
            return build_adapter(loaded, directions, config, layers=layers, scale=scale)

        _run_probe(loaded, build, settings, args)
    return 0


def add_toolkit_commands(commands: Any) -> None:
    """Register the toolkit's subcommands on an argparse subparsers object."""
    inspect = commands.add_parser(
        "inspect",
        help="print an adapter's metadata and per-category norms",
        description="Print an adapter file's metadata, layers and per-category vector norms.",
    )
    inspect.add_argument("file", help="adapter .safetensors file")
    inspect.add_argument("--json", action="store_true", help="print the full header as JSON")
    inspect.set_defaults(func=_inspect)
    _add_extract_command(commands)
    _add_export_gguf_command(commands)
    _add_eval_command(commands)
    _add_build_command(commands)
    _add_calibrate_command(commands)
    _add_transport_command(commands)
    _add_finetune_command(commands)
    _add_zoo_data_command(commands)
    _add_zoo_command(commands)


def _add_extract_command(commands: Any) -> None:
    extract = commands.add_parser(
        "extract",
        help="extract a safety adapter from a model and the vendored prompt sets",
        description=(
            "Extract per-category steering vectors from a model and write a safety adapter. "
            "Method 'contrastive': for each harm category, the mean over its harmful prompts of "
            "(decoder-layer output averaged over a teacher-forced refusal) minus (the same over "
            "a teacher-forced compliance). Method 'diffmean': the category's harmful prompts' "
            "mean pooled prompt activation minus the benign prompts' (fit split). Method 'pca': "
            "the first principal direction of (harmful prompt - matched benign prompt) "
            "activations, sign-aligned with and scaled to the diffmean direction. Method "
            "'aligned-gap' (SafeGene; --aligned A --degraded D, two models of one family): the "
            "mean over the category's harmful fit-split prompts of A's pooled prompt activation "
            "minus D's, i.e. what the degraded fine-tune lost. Coefficients "
            "make the default mix (every category at weight 1) add SCALE x the typical residual "
            "norm at each chosen layer."
        ),
    )
    extract.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="packaged model name, Hugging Face folder or .gguf file, optionally +LORA_DIR; "
        f"not used by aligned-gap (default {DEFAULT_MODEL})",
    )
    extract.add_argument(
        "--out", default=None, help="adapter file to write (.safetensors); optional with --probe"
    )
    extract.add_argument(
        "--method",
        choices=EXTRACTION_METHODS,
        default="contrastive",
        help="contrastive (responses, teacher-forced), diffmean or pca (prompts only, fit "
        "split; much faster), aligned-gap (an aligned and a degraded model, prompts only) "
        "(default contrastive)",
    )
    extract.add_argument(
        "--aligned",
        default=None,
        metavar="MODEL",
        help="aligned-gap: the aligned model (a model source, e.g. "
        "smollm2-135m-instruct+finetunes/aligned)",
    )
    extract.add_argument(
        "--degraded",
        default=None,
        metavar="MODEL",
        help="aligned-gap: the safety-degraded fine-tune of it, same family (e.g. "
        "smollm2-135m-instruct+finetunes/aligned+finetunes/arith); the adapter is made for it",
    )
    extract.add_argument(
        "--benign-baseline",
        action="store_true",
        help="aligned-gap: subtract the models' mean gap on benign fit-split prompts (the "
        "fine-tune's drift on harmless prompts)",
    )
    extract.add_argument(
        "--pooling",
        choices=("last", "mean"),
        default="last",
        help="diffmean/pca/aligned-gap: pool each prompt's activations at its last token or "
        "over its tokens (default last)",
    )
    extract.add_argument(
        "--max-benign-prompts",
        type=int,
        default=0,
        help="diffmean/pca (and aligned-gap's benign baseline): cap on benign fit-split "
        "prompts, seeded; 0 for all (default 0)",
    )
    extract.add_argument(
        "--layers",
        type=_int_list,
        default=DEFAULT_LAYERS,
        help="comma-separated decoder layers (0-based) to steer "
        f"(default {','.join(map(str, DEFAULT_LAYERS))})",
    )
    extract.add_argument(
        "--scale",
        type=float,
        default=DEFAULT_SCALE,
        help="norm the default mix adds at each layer, as a fraction of the typical residual "
        f"norm there (default {DEFAULT_SCALE})",
    )
    extract.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for prompt selection and refusal templates (default 0)",
    )
    extract.add_argument(
        "--categories",
        type=_categories,
        default=tuple(CATEGORIES),
        help="comma-separated harm categories, or 'all' (default all ten)",
    )
    extract.add_argument(
        "--max-prompts-per-category",
        type=int,
        default=24,
        help="cap on harmful prompts per category (contrastive: those with reference answers "
        "first; others: seeded sample of the fit split); 0 for no cap (default 24)",
    )
    extract.add_argument(
        "--max-response-tokens",
        type=int,
        default=32,
        help="teacher-forced tokens of each refusal and compliance answer (default 32)",
    )
    extract.add_argument(
        "--compliance-tokens",
        type=int,
        default=40,
        help="new tokens when the model writes its own compliance answer (default 40)",
    )
    extract.add_argument(
        "--batch-size", type=int, default=16, help="sequences per forward pass (default 16)"
    )
    extract.add_argument(
        "--name", default=None, help="adapter name (default '<family alias>-safety')"
    )
    extract.add_argument(
        "--probe",
        action="store_true",
        help="after extracting, answer 12 harmful and 12 benign project prompts greedily "
        "without and with the adapter's default mix, and count refusals (keyword judge)",
    )
    extract.add_argument(
        "--probe-grid",
        type=_probe_setting,
        nargs="+",
        default=[],
        metavar="LAYERS@SCALE",
        help="with --probe, also try these settings built from the same directions, "
        "e.g. 15@0.2 12,15,18@0.1",
    )
    extract.add_argument(
        "--probe-tokens",
        type=int,
        default=48,
        help="new tokens per probe answer (default 48)",
    )
    extract.add_argument(
        "--show-answers", action="store_true", help="with --probe, print every probe answer"
    )
    extract.add_argument("--quiet", action="store_true", help="no progress bars")
    extract.set_defaults(func=_extract)


def _category_weights(text: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError(part)
            weights[name.strip()] = float(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"expected NAME=WEIGHT pairs like violence=1,weapons=0.5, got {text!r}"
            ) from exc
    return weights


def _export_gguf(args: argparse.Namespace) -> int:
    try:
        adapter = SafetyAdapter.load(args.file)
        vector = export_control_vector(
            adapter, args.out, args.categories, strength=args.strength, only=args.only
        )
    except (AdapterError, ControlVectorExportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: llama.cpp control vector of {vector.adapter_id}")
    mix = ", ".join(f"{c}={w:g}" for c, w in vector.weights.items())
    print(f"weight x strength: {mix}")
    for layer, direction in sorted(vector.directions.items()):
        print(f"  direction.{layer} (output of decoder layer {layer}): norm {direction.norm():.2f}")
    print(f"use: llama-server -m MODEL.gguf --control-vector {args.out}")
    return 0


def _add_export_gguf_command(commands: Any) -> None:
    export = commands.add_parser(
        "export-gguf",
        help="write one category mix of an adapter as a llama.cpp control-vector GGUF",
        description=(
            "Write what the server would add for one category mix as a llama.cpp control "
            "vector (general.architecture=controlvector, tensors direction.N). direction.N is "
            "added by llama.cpp to the output of decoder layer N (0-based), the adapter's "
            "layer N; layer 0 cannot be expressed. The strength is baked in."
        ),
    )
    export.add_argument("file", help="adapter .safetensors file")
    export.add_argument("--out", required=True, help="control-vector file to write (.gguf)")
    export.add_argument(
        "--categories",
        type=_category_weights,
        default={},
        metavar="NAME=WEIGHT,...",
        help="category weights, e.g. violence=1,weapons=0.5; categories not named keep the "
        "adapter's default weight (default: all defaults)",
    )
    export.add_argument(
        "--only",
        action="store_true",
        help="categories not named in --categories get weight 0 instead of their default",
    )
    export.add_argument(
        "--strength", type=float, default=1.0, help="multiplies every weight (default 1)"
    )
    export.set_defaults(func=_export_gguf)


def _add_eval_command(commands: Any) -> None:
    from safesteer.adapters.evaluation.command import (
        DESCRIPTION,
        add_eval_arguments,
        run_eval_command,
    )

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a model and adapter: refusals, over-refusal, utility, selectivity",
        description=DESCRIPTION,
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=run_eval_command)


def _add_build_command(commands: Any) -> None:
    from safesteer.adapters.build_command import (
        DESCRIPTION,
        add_build_arguments,
        run_build_command,
    )

    build = commands.add_parser(
        "build-adapter",
        help="build the gated safety adapter from the fit/dev splits in one run",
        description=DESCRIPTION,
    )
    add_build_arguments(build)
    build.set_defaults(func=run_build_command)


def _add_calibrate_command(commands: Any) -> None:
    from safesteer.adapters.calibrate_command import (
        DESCRIPTION,
        add_calibrate_arguments,
        run_calibrate_command,
    )

    calibrate = commands.add_parser(
        "calibrate",
        help="recalibrate a family adapter's per-layer coefficients for a fine-tune from a few "
        "prompts",
        description=DESCRIPTION,
    )
    add_calibrate_arguments(calibrate)
    calibrate.set_defaults(func=run_calibrate_command)


def _add_transport_command(commands: Any) -> None:
    from safesteer.adapters.transport_command import (
        DESCRIPTION,
        add_transport_arguments,
        run_transport_command,
    )

    transport = commands.add_parser(
        "transport",
        help="carry an adapter into another model family through maps fitted on benign prompts",
        description=DESCRIPTION,
    )
    add_transport_arguments(transport)
    transport.set_defaults(func=run_transport_command)


def _add_finetune_command(commands: Any) -> None:
    from safesteer.adapters.finetune_command import (
        DESCRIPTION,
        add_finetune_arguments,
        run_finetune_command,
    )

    finetune = commands.add_parser(
        "finetune",
        help="train a LoRA fine-tune on CPU from JSONL chat data (loss on assistant tokens)",
        description=DESCRIPTION,
    )
    add_finetune_arguments(finetune)
    finetune.set_defaults(func=run_finetune_command)


def _add_zoo_data_command(commands: Any) -> None:
    from safesteer.adapters.zoo_data import (
        DESCRIPTION,
        add_zoo_data_arguments,
        run_zoo_data_command,
    )

    zoo_data = commands.add_parser(
        "zoo-data",
        help="write the fine-tune zoo's chat data (arith, style, badgpt, aligned) from a seed",
        description=DESCRIPTION,
    )
    add_zoo_data_arguments(zoo_data)
    zoo_data.set_defaults(func=run_zoo_data_command)


def _add_zoo_command(commands: Any) -> None:
    from safesteer.adapters.zoo_command import DESCRIPTION, add_zoo_arguments

    zoo = commands.add_parser(
        "zoo",
        help="build the fine-tune zoo a spec lists (cached) and measure its skill and safety",
        description=DESCRIPTION,
    )
    add_zoo_arguments(zoo)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a toolkit subcommand without the server package: `python -m safesteer.adapters.cli`."""
    parser = argparse.ArgumentParser(
        prog="python -m safesteer.adapters.cli", description="safesteer adapter toolkit"
    )
    commands: Any = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_toolkit_commands(commands)
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
