"""The `safesteer calibrate` command line: its flags, and running a recalibration."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.calibrate import (
    DEFAULT_GRID,
    DEFAULT_REFUSAL,
    DEFAULT_SHOTS,
    GATE_RULES,
    REFERENCE_MODES,
    REFUSAL_SPANS,
    SPLITS,
    CalibrationConfig,
    CalibrationResult,
    calibrate,
    with_calibration_fields,
)
from safesteer.adapters.errors import AdapterError, AdapterMismatch, ModelLoadError
from safesteer.adapters.loading import LoadedModel, load_model

DEFAULTS = CalibrationConfig()
DESCRIPTION = (
    "Recalibrate a family adapter for one fine-tune from a few prompts, with no generation: "
    "keep the adapter's vectors (bit for bit) and choose one multiplier per steering layer "
    "from a grid, so that the fine-tune, steered, refuses the harmful shots at least as "
    "readily as the reference model does and the benign shots at most as readily (mean "
    "per-token log-probability of a teacher-forced refusal's opening clause, one forward pass "
    "per grid point). "
    "Shots: at most --shots fit-split prompts, seeded, half harmful over the adapter's "
    "categories, half benign (edgy and plain). The reference is the model the adapter was "
    "made for (its recipe's model), steered by the adapter as is; --reference-mode plain "
    "compares with the reference unsteered (e.g. the aligned model). Writes an adapter with "
    "the same vectors, coefficients times the multipliers, the fine-tune's weights "
    "fingerprint as base_fingerprint, and the calibration (shots, grid, every score, the "
    "choice) in its recipe; pin it to the fine-tune with `adapter = ...` in a registry "
    "config's [[models]] entry."
)


def _grid(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one multiplier")
    return values


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `safesteer calibrate`."""
    add = parser.add_argument
    add("--adapter", type=Path, required=True, help="the family adapter (.safetensors)")
    add(
        "--model",
        required=True,
        help="the fine-tune to calibrate for: BASE+LORA_DIR[+LORA_DIR...], a Hugging Face "
        "folder or .gguf file",
    )
    add("--out", type=Path, required=True, help="calibrated adapter file to write")
    add(
        "--reference",
        default=None,
        metavar="MODEL",
        help="the model whose behaviour to restore (default: the adapter recipe's model, "
        "the one it was made for)",
    )
    add(
        "--reference-mode",
        choices=REFERENCE_MODES,
        default="steered",
        help="steered: the reference steered by the adapter as is (transfer its operating "
        "point); plain: the reference unsteered (default steered)",
    )
    add(
        "--gate",
        choices=GATE_RULES,
        default="shift",
        help="shift: move each gate threshold by the benign shots' probe-score shift between "
        "the reference and the model; keep: leave the thresholds (default shift)",
    )
    add(
        "--shots",
        type=int,
        default=DEFAULT_SHOTS,
        help=f"prompts, half harmful, half benign (default {DEFAULT_SHOTS})",
    )
    add(
        "--grid",
        type=_grid,
        default=DEFAULT_GRID,
        metavar="M,M,...",
        help="multipliers tried per layer (default "
        + ",".join(f"{g:g}" for g in DEFAULT_GRID)
        + ")",
    )
    add("--seed", type=int, default=0, help="seed for the shots (default 0)")
    add(
        "--split",
        choices=SPLITS,
        default="fit",
        help="where the shots come from (default fit; the test split is never read)",
    )
    add(
        "--refusal",
        default=None,
        help="refusal text to teacher-force (default: the adapter recipe's, else "
        f"{DEFAULT_REFUSAL!r})",
    )
    add(
        "--refusal-span",
        choices=REFUSAL_SPANS,
        default="opening",
        help="score the refusal's opening clause, up to its first comma or full stop, where "
        "the model decides (default), or the whole sentence",
    )
    add(
        "--sweeps",
        type=int,
        default=1,
        help="rounds of the layer-by-layer search (default 1)",
    )
    add(
        "--max-prompt-tokens",
        type=int,
        default=DEFAULTS.max_prompt_tokens,
        help="shots only from prompts whose chat prompt has at most this many tokens; bounds "
        f"the padded batch (default {DEFAULTS.max_prompt_tokens})",
    )
    add(
        "--batch-size",
        type=int,
        default=DEFAULTS.batch_size,
        help=f"sequences per forward pass (default {DEFAULTS.batch_size})",
    )
    add("--name", default=None, help="adapter name (default '<adapter>.cal.<model>.<digest>')")
    add(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default torch's)",
    )
    add("--quiet", action="store_true", help="no progress bar")


def canonical_command(args: argparse.Namespace) -> str:
    """The command line that reproduces a calibration, every setting spelled out."""
    parts = ["safesteer", "calibrate", "--adapter", str(args.adapter), "--model", args.model]
    parts += ["--out", str(args.out)]
    parts += ["--reference", args.reference] if args.reference is not None else []
    parts += ["--reference-mode", args.reference_mode, "--gate", args.gate]
    parts += ["--shots", str(args.shots)]
    parts += ["--grid", ",".join(f"{g:g}" for g in args.grid), "--seed", str(args.seed)]
    parts += ["--split", args.split, "--sweeps", str(args.sweeps)]
    parts += ["--refusal", args.refusal] if args.refusal is not None else []
    parts += ["--refusal-span", args.refusal_span]
    parts += ["--max-prompt-tokens", str(args.max_prompt_tokens)]
    parts += ["--batch-size", str(args.batch_size)]
    parts += ["--name", args.name] if args.name is not None else []
    parts += ["--threads", str(args.threads)] if args.threads is not None else []
    return shlex.join(parts)


def config_from_args(args: argparse.Namespace) -> CalibrationConfig:
    return CalibrationConfig(
        shots=args.shots,
        grid=args.grid,
        seed=args.seed,
        split=args.split,
        refusal=args.refusal,
        refusal_span=args.refusal_span,
        reference_mode=args.reference_mode,
        gate=args.gate,
        sweeps=args.sweeps,
        max_prompt_tokens=args.max_prompt_tokens,
        batch_size=args.batch_size,
        name=args.name,
        show_progress=not args.quiet,
    )


def reference_source(adapter: SafetyAdapter, given: str | None) -> str:
    """`given`, else the source of the model the adapter's recipe says it was made for.

    Raises:
        ValueError: neither is there.
    """
    if given is not None:
        return given
    model = adapter.metadata.recipe.get("model")
    source = model.get("source") if isinstance(model, dict) else None
    if not isinstance(source, str) or not source:
        raise ValueError(
            f"adapter {adapter.id} does not record the model it was made for; pass --reference"
        )
    return source


def _load_pair(
    adapter: SafetyAdapter, model: str, reference: str | None
) -> tuple[LoadedModel, LoadedModel]:
    """The fine-tune (checked against the adapter's family first) and the reference."""
    loaded = load_model(model)
    adapter.check_fits(loaded.family)
    spec = reference_source(adapter, reference)
    return loaded, (loaded if spec == model else load_model(spec))


def _report(result: CalibrationResult, loaded: LoadedModel, reference: LoadedModel) -> None:
    def line(label: str, harmful: float, benign: float, objective: float | None = None) -> str:
        tail = "" if objective is None else f"   objective {objective:+.4f}"
        return f"  {label:<34} harmful {harmful:+.4f}   benign {benign:+.4f}{tail}"

    recipe = result.adapter.metadata.recipe["calibration"]
    print(
        f"{len(result.shots)} shots ({recipe['shots']['harmful']} harmful, "
        f"{recipe['shots']['benign']} benign); refusal log-likelihood, nats per token:"
    )
    mode = recipe["reference"]["mode"]
    ref = result.reference
    print(line(f"reference {reference.name} ({mode})", ref.harmful, ref.benign))
    as_is = result.as_is
    print(line(f"{loaded.name} as is", as_is.score.harmful, as_is.score.benign, as_is.objective))
    final = result.calibrated
    print(
        line(f"{loaded.name} calibrated", final.score.harmful, final.score.benign, final.objective)
    )
    chosen = ", ".join(f"layer {layer} x{m:g}" for layer, m in sorted(result.multipliers.items()))
    print(f"multipliers: {chosen}")
    if result.gate_shift is not None:
        shifts = result.gate_shift.shifts.values()
        print(
            f"gate thresholds shifted by {min(shifts):+.3f} .. {max(shifts):+.3f} "
            f"(probe-score shift of the {result.gate_shift.prompts} benign shots)"
        )
    if not recipe["reference"]["is_adapter_base"] and mode == "steered":
        print(
            "note: the reference's weights are not the ones the adapter records "
            "(base_fingerprint): the operating point transferred is the reference's",
            file=sys.stderr,
        )


def run_calibrate_command(args: argparse.Namespace) -> int:
    """Run `safesteer calibrate` from parsed flags; 2 on a usage, adapter or model error."""
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        config = config_from_args(args)
        adapter = SafetyAdapter.load(args.adapter)
        loaded, reference = _load_pair(adapter, args.model, args.reference)
        load_seconds = time.perf_counter() - started
        print(
            f"calibrating {adapter.id} for {loaded.name} (family {loaded.family.id}) against "
            f"{reference.name}; models loaded in {load_seconds:.1f} s",
            flush=True,
        )
        result = calibrate(adapter, loaded, reference, config)
    except AdapterMismatch as exc:
        print(
            f"error: {args.adapter.name} cannot be calibrated for this model: {exc}",
            file=sys.stderr,
        )
        return 2
    except (AdapterError, ModelLoadError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = time.perf_counter() - started
    calibrated = with_calibration_fields(
        result.adapter,
        command=canonical_command(args),
        load_seconds=round(load_seconds, 2),
        total_seconds=round(total, 2),
        threads=torch.get_num_threads(),
    )
    _report(result, loaded, reference)
    path = calibrated.save(args.out)
    print(
        f"wrote {path} ({calibrated.id}) in {total:.1f} s ({result.seconds:.1f} s calibrating, "
        f"{result.adapter.metadata.recipe['calibration']['forward_passes']} forward passes)"
    )
    print(
        f'pin it in a registry config: [[models]] source = "{args.model}" '
        f'adapter = "{path.name}" (a path inside adapter_dir)'
    )
    return 0
