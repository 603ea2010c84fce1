"""The `safesteer transport` command line: carry an adapter into another model family."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.calibrate_command import reference_source
from safesteer.adapters.errors import AdapterError, AdapterMismatch, ModelLoadError
from safesteer.adapters.loading import load_model
from safesteer.adapters.splits import Split, benign_split, load_benign_file
from safesteer.adapters.transport import DEFAULT_RIDGE, TransportConfig, transport_adapter

DESCRIPTION = (
    "Carry a safety adapter of one model family into another: fit ridge maps between the two "
    "models' residual streams (at the same relative depth) on benign prompts only, push each "
    "category's vector through them with its norm kept relative to each layer's typical "
    "norm, and map the gate's probes back through the reverse map, recalibrating their "
    "thresholds on the target's benign prompts. Writes an adapter of the target family with "
    "the layer map, the ridge, each map's held-out R^2 and sha256 and the prompts' digest in "
    "its recipe. Fit prompts default to the project's benign fit split, calibration prompts "
    "to its benign dev split (the test split is never read)."
)


def add_transport_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `safesteer transport`."""
    add = parser.add_argument
    add("--source", type=Path, required=True, help="the adapter to transport (.safetensors)")
    add(
        "--source-model",
        default=None,
        metavar="MODEL",
        help="a model of the source adapter's family (default: the one its recipe names)",
    )
    add("--target-model", required=True, metavar="MODEL", help="a model of the target family")
    add(
        "--fit-prompts",
        type=Path,
        default=None,
        metavar="FILE.jsonl",
        help='benign prompts for the maps, rows {"prompt": ...} (default: the project\'s '
        "benign fit split)",
    )
    add(
        "--calibration-prompts",
        type=Path,
        default=None,
        metavar="FILE.jsonl",
        help="benign prompts for the gate's thresholds (default: the project's benign dev "
        "split, or --fit-prompts when given)",
    )
    add(
        "--ridge",
        type=float,
        default=DEFAULT_RIDGE,
        help=f"ridge, as a share of the mean input variance (default {DEFAULT_RIDGE:g})",
    )
    add("--no-gate", action="store_true", help="transport the vectors only, no gate")
    add("--name", default=None, help="adapter name (default '<target alias>-safety-transported')")
    add("--out", type=Path, required=True, help="adapter file to write")
    add("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    add("--quiet", action="store_true", help="no progress bars")


def canonical_command(args: argparse.Namespace, source_model: str) -> str:
    parts = ["safesteer", "transport", "--source", str(args.source)]
    parts += ["--source-model", source_model, "--target-model", args.target_model]
    parts += ["--fit-prompts", str(args.fit_prompts)] if args.fit_prompts else []
    if args.calibration_prompts:
        parts += ["--calibration-prompts", str(args.calibration_prompts)]
    parts += ["--ridge", f"{args.ridge:g}"] + (["--no-gate"] if args.no_gate else [])
    parts += ["--name", args.name] if args.name else []
    parts += ["--out", str(args.out), "--batch-size", str(args.batch_size)]
    return shlex.join(parts)


def _prompts(path: Path | None, split: Split) -> list[str]:
    """The prompts of a JSONL file, else those of the project's benign `split`."""
    if path is not None:
        return [p.prompt for p in load_benign_file(path)]
    return [p.prompt for p in benign_split(split)]


def run_transport_command(args: argparse.Namespace) -> int:
    """Run `safesteer transport`; 2 on a usage, adapter, prompt-file or model error."""
    started = time.perf_counter()
    try:
        config = TransportConfig(
            ridge=args.ridge,
            gate=not args.no_gate,
            name=args.name,
            batch_size=args.batch_size,
            show_progress=not args.quiet,
        )
        source = SafetyAdapter.load(args.source)
        source_spec = reference_source(source, args.source_model)
        fit = _prompts(args.fit_prompts, "fit")
        if args.calibration_prompts is not None:
            calibration = _prompts(args.calibration_prompts, "dev")
        else:
            calibration = fit if args.fit_prompts is not None else _prompts(None, "dev")
        source_model = load_model(source_spec)
        target_model = load_model(args.target_model)
        print(
            f"transporting {source.id} ({source.metadata.family}) into {target_model.name} "
            f"({target_model.family.id}) on {len(fit)} benign prompts",
            flush=True,
        )
        result = transport_adapter(source, source_model, target_model, fit, calibration, config)
    except AdapterMismatch as exc:
        print(f"error: {args.source.name} does not fit the source model: {exc}", file=sys.stderr)
        return 2
    except (AdapterError, ModelLoadError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    adapter = result.adapter
    recipe = dict(adapter.metadata.recipe)
    recipe["command"] = canonical_command(args, source_spec)
    seconds = time.perf_counter() - started
    adapter = replace(adapter, metadata=replace(adapter.metadata, recipe=recipe))
    for source_layer, target_layer in sorted(result.layer_map.items()):
        r2 = result.maps[source_layer].held_out_r2
        print(f"layer {source_layer} -> {target_layer}: map R^2 on held-out prompts {r2:.3f}")
    gate = recipe.get("gate")
    if isinstance(gate, dict):
        print(
            f"gate: layer {gate['source_detection_layer']} -> {gate['detection_layer']}, reverse "
            f"map R^2 {gate['reverse_map_held_out_r2']:.3f}, fires on "
            f"{gate['calibration_fired']:.1%} of the calibration prompts"
        )
    path = adapter.save(args.out)
    print(f"wrote {path} ({adapter.id}) in {seconds:.1f} s")
    return 0
