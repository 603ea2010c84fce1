"""The `safesteer build-adapter` command line: its flags, and running a build."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from safesteer.adapters.adapter import POOLINGS
from safesteer.adapters.build import BuildConfig, BuildResult, build, save_outputs
from safesteer.adapters.errors import AdapterError, ModelLoadError
from safesteer.adapters.gating import METHODS as GATE_METHODS
from safesteer.adapters.layer_selection import SelectionRule
from safesteer.adapters.loading import DEFAULT_MODEL, load_model
from safesteer.adapters.merging import SCHEMES

DESCRIPTION = (
    "Build a gated safety adapter from the project's fit and dev splits in one run: extract "
    "contrastive per-category directions (fit), fit and calibrate condition probes at each "
    "detection layer and pooling and keep the best on dev, score the candidate steering layers "
    "above it on dev and choose layers and per-layer scales under the gate's exposure, choose "
    "the steering strength on dev prompts on which the gate fires, and write the adapter with "
    "its full recipe plus a PNG of the scores next to it. The test split is never read."
)
DEFAULTS = BuildConfig()


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _poolings(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names or set(names) - set(POOLINGS):
        raise argparse.ArgumentTypeError(f"expected poolings among {', '.join(POOLINGS)}")
    return names


def _csv(values: tuple[float, ...] | tuple[int, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `safesteer build-adapter`."""
    rule = DEFAULTS.rule
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help=f"model to build for (default {DEFAULT_MODEL})")
    add("--out", type=Path, required=True, help="adapter file to write (.safetensors)")
    add("--seed", type=int, default=DEFAULTS.seed, help="seed for sampling (default 0)")
    add("--name", default=None, help="adapter name (default '<family alias>-safety')")
    add(
        "--refusal",
        default=DEFAULTS.refusal,
        help="refusal teacher-forced on every fit prompt; '' for the data sets' references and "
        f"templates (default {DEFAULTS.refusal!r})",
    )
    add(
        "--candidate-layers",
        type=_ints,
        default=DEFAULTS.candidate_layers,
        help=f"steering layers to score (default {_csv(DEFAULTS.candidate_layers)})",
    )
    add(
        "--scales",
        type=_floats,
        default=DEFAULTS.scales,
        help="pushes to score each layer at, as fractions of its typical residual norm "
        f"(default {_csv(DEFAULTS.scales)})",
    )
    add("--max-kl", type=float, default=rule.max_kl, help=f"KL budget (default {rule.max_kl:g})")
    add(
        "--max-over-refusal-gain",
        type=float,
        default=rule.max_over_refusal_gain,
        help=f"over-refusal budget (default {rule.max_over_refusal_gain:g})",
    )
    add("--steering-layers", type=int, default=rule.count, help="how many layers to choose")
    add(
        "--detection-layers",
        type=_ints,
        default=DEFAULTS.detection_layers,
        help=f"gate layers to try (default {_csv(DEFAULTS.detection_layers)})",
    )
    add(
        "--poolings",
        type=_poolings,
        default=DEFAULTS.poolings,
        help=f"gate poolings to try (default {','.join(DEFAULTS.poolings)})",
    )
    add(
        "--gate-method",
        choices=GATE_METHODS,
        default=DEFAULTS.gate_method,
        help=f"how the condition probes are fitted (default {DEFAULTS.gate_method})",
    )
    add(
        "--target-fpr",
        type=float,
        default=DEFAULTS.target_fpr,
        help="share of benign dev prompts, and of dev benchmark questions, on which any "
        f"category may fire (default {DEFAULTS.target_fpr:g})",
    )
    add(
        "--calibration-folds",
        type=int,
        default=DEFAULTS.calibration_folds,
        help="folds in which the benign fit prompts are scored out of fold to join benign dev "
        "in calibrating the thresholds; 0: benign dev alone "
        f"(default {DEFAULTS.calibration_folds})",
    )
    add(
        "--fit-questions",
        type=int,
        default=DEFAULTS.fit_questions,
        help="MMLU/ARC questions that safesteer eval does not score, added to the gate's benign "
        f"fit prompts (default {DEFAULTS.fit_questions})",
    )
    add(
        "--strengths",
        type=_floats,
        default=DEFAULTS.strengths,
        help=f"multipliers of the chosen scales to try (default {_csv(DEFAULTS.strengths)})",
    )
    add(
        "--min-coherent",
        type=float,
        default=DEFAULTS.min_coherent,
        help=f"coherent share a strength needs (default {DEFAULTS.min_coherent:g})",
    )
    add(
        "--merge",
        choices=SCHEMES,
        default=DEFAULTS.merge,
        help=f"merge scheme to calibrate for (default {DEFAULTS.merge})",
    )
    add("--batch-size", type=int, default=DEFAULTS.batch_size, help="rows per forward pass")
    add("--quiet", action="store_true", help="no progress bars")


def canonical_command(args: argparse.Namespace) -> str:
    """The command line that reproduces a build, every setting spelled out."""
    parts = ["safesteer", "build-adapter", "--model", args.model, "--out", str(args.out)]
    parts += ["--seed", str(args.seed)]
    parts += ["--name", args.name] if args.name else []
    parts += ["--refusal", args.refusal]
    parts += ["--candidate-layers", _csv(args.candidate_layers), "--scales", _csv(args.scales)]
    parts += ["--max-kl", f"{args.max_kl:g}"]
    parts += ["--max-over-refusal-gain", f"{args.max_over_refusal_gain:g}"]
    parts += ["--steering-layers", str(args.steering_layers)]
    parts += ["--detection-layers", _csv(args.detection_layers)]
    parts += ["--poolings", ",".join(args.poolings), "--gate-method", args.gate_method]
    parts += ["--target-fpr", f"{args.target_fpr:g}"]
    parts += ["--calibration-folds", str(args.calibration_folds)]
    parts += ["--fit-questions", str(args.fit_questions)]
    parts += ["--strengths", _csv(args.strengths)]
    parts += ["--min-coherent", f"{args.min_coherent:g}", "--merge", args.merge]
    parts += ["--batch-size", str(args.batch_size)]
    return shlex.join(parts)


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    return BuildConfig(
        seed=args.seed,
        name=args.name,
        refusal=args.refusal or None,
        candidate_layers=args.candidate_layers,
        scales=args.scales,
        rule=SelectionRule(args.max_kl, args.max_over_refusal_gain, args.steering_layers),
        detection_layers=args.detection_layers,
        poolings=args.poolings,
        gate_method=args.gate_method,
        target_fpr=args.target_fpr,
        calibration_folds=args.calibration_folds,
        fit_questions=args.fit_questions,
        strengths=args.strengths,
        min_coherent=args.min_coherent,
        merge=args.merge,
        batch_size=args.batch_size,
        show_progress=not args.quiet,
        command=canonical_command(args),
    )


def print_summary(result: BuildResult) -> None:
    summary = result.summary
    exposure = summary.exposure
    print(
        "gate candidates (TPR: harmful dev, FPR: benign dev held out, Q: dev questions "
        "held out): "
        + ", ".join(
            f"L{g.layer} {g.pooling} TPR {g.harmful_tpr:.1%} FPR {g.benign_fpr:.1%}"
            + ("" if g.questions_fpr is None else f" Q {g.questions_fpr:.1%}")
            for g in summary.gate_candidates
        )
        + f"; chosen L{summary.detection_layer} {summary.detection_pooling}"
    )
    print(
        "layer scores (dev, always-on; gains in points, KL in nats; score = refusal+ x "
        f"{exposure.harmful:.3f} - over-ref+ x {exposure.benign:.3f}, the gate's exposure):"
    )
    print(f"  {'layer':>5} {'scale':>6} {'refusal+':>9} {'over-ref+':>10} {'score':>6} {'KL':>7}")
    for s in summary.layer_scores:
        mark = " *" if summary.layers.get(s.layer) == s.scale else ""
        print(
            f"  {s.layer:>5} {s.scale:>6g} {100 * s.refusal_gain:>9.0f} "
            f"{100 * s.over_refusal_gain:>10.0f} {100 * exposure.selective_gain(s):>6.0f} "
            f"{s.kl:>7.3f}{mark}"
        )
    print("gated settings (harmful dev prompts that fire):")
    for score in summary.strength_scores:
        mark = " *" if score.layers == tuple(sorted(summary.layers)) else ""
        mark = mark if score.strength == summary.strength else ""
        layers = "+".join(map(str, score.layers))
        print(
            f"  layers {layers:<8} x {score.strength:<4g} refused {score.refused:>4.0%} coherent "
            f"{score.coherent:>4.0%} both {score.refused_coherent:>4.0%} of {score.fired}; "
            f"benign fired {score.benign_fired}, refused "
            f"{score.benign_refused:.0%}{mark}"
        )
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items()))


def run_build_command(args: argparse.Namespace) -> int:
    """Run `safesteer build-adapter` from parsed flags; 2 on a usage or input error."""
    started = time.perf_counter()
    try:
        config = config_from_args(args)
        loaded = load_model(args.model)
        result = build(loaded, config, progress=lambda message: print(message, flush=True))
        written = save_outputs(result, args.out)
    except (AdapterError, ModelLoadError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(result)
    print(f"wrote {', '.join(map(str, written))} ({result.adapter.id})")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0
