"""`python -m safesteer.adapters.evaluation.safegene_table`: run the SafeGene suite on one zoo
fine-tune, write its results.json, report.md and the three adapters it made (`safegene_suite`
says what is measured)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import AdapterError, ModelLoadError
from safesteer.adapters.evaluation.judging import JudgeInfo
from safesteer.adapters.evaluation.safegene_suite import (
    DEFAULT_LIMIT,
    OVER_REFUSAL_TARGET,
    RESTORED_TARGET,
    ROWS,
    SKILL_POINTS_TARGET,
    STEERED_ROWS,
    SafeGeneSettings,
    run_safegene_suite,
)
from safesteer.adapters.loading import load_model
from safesteer.adapters.zoo_skill import SkillSettings, task_sets
from safesteer.adapters.zoo_spec import ZooSpecError, load_spec

DEFAULT_SPEC = Path("adapters/qwen2.5-0.5b/zoo/zoo.toml")
DEFAULT_DONOR = Path("adapters/qwen2.5-0.5b/transport/forward-native.safetensors")
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
ADAPTER_FILES = {
    "family": "family.safetensors",
    "recalibrated": "recalibrated.safetensors",
    "donor-recalibrated": "donor-recalibrated.safetensors",
}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "missed")


def _target_lines(targets: Mapping[str, Any]) -> list[str]:
    lines = [
        f"Refusal the fine-tune lost: {_pct(targets['refusal_lost'])} (aligned minus degraded).",
        "",
        f"| adapter | refusal restored (target >= {100 * RESTORED_TARGET:.0f} %) | over-refusal "
        f"<= {100 * OVER_REFUSAL_TARGET:.0f} % | task skill change (target within "
        f"{SKILL_POINTS_TARGET:g} points) |",
        "|---|---|---|---|",
    ]
    for name in STEERED_ROWS:
        row = targets[name]
        lines.append(
            f"| {name} | {_pct(row['restored'])} ({_verdict(row['restored_met'])}) | "
            f"{_verdict(row['over_refusal_met'])} | {row['skill_points']:+.1f} points "
            f"({_verdict(row['skill_met'])}) |"
        )
    return lines


def _multipliers(calibration: Mapping[str, Any]) -> str:
    return ", ".join(f"layer {la} x{m:g}" for la, m in calibration["multipliers"].items())


def render_safegene(document: Mapping[str, Any]) -> str:
    """The Markdown report of a SafeGene suite's results document."""
    settings = document["settings"]
    limit = settings["limit"]
    task = document["targets"]["task"]
    family = document["family_adapter"]
    recal = document["recalibrated_adapter"]
    donor_recal = document["donor_recalibrated_adapter"]
    rows = document["rows"]
    lines = [
        "# SafeGene table: a benign fine-tune erodes native alignment; steering to restore it",
        "",
        f"Aligned model `{document['aligned']['source']}`; degraded fine-tune "
        f"`{document['degraded']['source']}` (fingerprint "
        f"`{document['degraded']['fingerprint'][:12]}`).",
        "",
        f"Family adapter `{family['id']}`: aligned-gap vectors (aligned minus degraded, "
        f"{family['pooling']} prompt token, {family['prompts']} harmful fit prompts"
        + (
            f", minus the gap on {family['benign_prompts']} benign fit prompts"
            if family["benign_baseline"]
            else ""
        )
        + f") at layers {family['layers']} with push {family['push']:g} of the typical residual "
        f"norm, behind the gate of `{family['gate_from']}`. Recalibrated adapter "
        f"`{recal['id']}`: {recal['shots']} shots against {recal['reference']}, "
        f"{_multipliers(recal)} ({recal['seconds']:.1f} s).",
        "",
        f"Donor `{document['donor']['id']}`: {document['donor']['role']} (its own directions and "
        f"gate). Donor recalibrated `{donor_recal['id']}`: {donor_recal['shots']} shots against "
        f"{donor_recal['reference']}, {_multipliers(donor_recal)} "
        f"({donor_recal['seconds']:.1f} s).",
        "",
        f"Seeded subsets of the test splits ({limit} harmful, {limit} benign prompts, seed "
        f"{settings['seed']}) and of the `{task}` eval set ({limit} prompts), greedy, "
        f"{settings['max_new_tokens']} new tokens (task answers: the task's own budget).",
        "",
        f"{JudgeInfo(**dict(document['judge'])).line()}.",
        "",
        f"| row | harmful refused | over-refusal | edgy over-refusal | {task} skill | rows "
        "steered (harmful / benign / task) |",
        "|---|---|---|---|---|---|",
    ]
    for name, _, _ in ROWS:
        row = rows[name]
        steered = row["steered"]
        lines.append(
            f"| {name} | {_pct(row['harmful_refusal'])} | {_pct(row['over_refusal'])} | "
            f"{_pct(row['over_refusal_edgy'])} | {_pct(row['task']['score'])} | "
            f"{steered['harmful']} / {steered['benign']} / {steered[task]} |"
        )
    lines += ["", *_target_lines(document["targets"]), ""]
    files = ", ".join(f"`{f}`" for f in document.get("adapter_files", {}).values())
    lines += [f"Adapters written next to this report: {files}." if files else ""]
    lines += ["", f"Command: `{document['command']}`", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m safesteer.adapters.evaluation.safegene_table",
        description="SafeGene on one zoo fine-tune: extract aligned-gap vectors (its parent "
        "minus it) at the gate donor's layers and push, put them behind the donor's gate, "
        "recalibrate them on the fine-tune with a few shots against the unsteered parent, and "
        "measure harmful refusal, over-refusal and task skill for the parent, the fine-tune, "
        "and the fine-tune with each adapter, the donor as is and recalibrated included. Writes "
        "results.json, report.md and the three adapters it made.",
    )
    add = parser.add_argument
    add("--spec", type=Path, default=DEFAULT_SPEC, help=f"zoo spec (default {DEFAULT_SPEC})")
    add("--zoo", type=Path, required=True, help="folder the zoo's fine-tunes were built into")
    add("--data", type=Path, required=True, help="folder of the zoo data (its task eval files)")
    add("--finetune", default="arith", help="the degraded fine-tune (default arith)")
    add(
        "--gate-from",
        type=Path,
        default=DEFAULT_DONOR,
        help=f"gated adapter of the family whose gate, layers and push are used (default "
        f"{DEFAULT_DONOR})",
    )
    add(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"prompts per set (default {DEFAULT_LIMIT})",
    )
    add("--shots", type=int, default=16, help="calibration shots (default 16)")
    add("--pooling", choices=("last", "mean"), default="last", help="gap pooling (default last)")
    add(
        "--no-benign-baseline",
        action="store_true",
        help="do not subtract the gap on benign fit prompts",
    )
    add("--max-new-tokens", type=int, default=64, help="greedy tokens per answer (default 64)")
    add("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    add("--judge", choices=("keyword", "embedding"), default="keyword", help="refusal judge")
    add("--seed", type=int, default=0, help="seed of prompt subsets and shots (default 0)")
    add("--out", type=Path, required=True, help="folder for results.json, report.md, adapters")
    add("--render", action="store_true", help="only render --out's results.json again")
    add("--quiet", action="store_true", help="no progress bars")
    return parser


def canonical_command(args: argparse.Namespace) -> str:
    parts = ["python", "-m", "safesteer.adapters.evaluation.safegene_table"]
    parts += ["--spec", str(args.spec), "--zoo", str(args.zoo), "--data", str(args.data)]
    parts += ["--finetune", args.finetune, "--gate-from", str(args.gate_from)]
    parts += ["--limit", str(args.limit), "--shots", str(args.shots), "--pooling", args.pooling]
    parts += ["--no-benign-baseline"] if args.no_benign_baseline else []
    parts += ["--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
    parts += ["--judge", args.judge, "--seed", str(args.seed), "--out", str(args.out)]
    return shlex.join(parts)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    spec = load_spec(args.spec)
    finetune = spec.finetune(args.finetune)
    task = finetune.task
    if task is None:
        raise ZooSpecError(f"fine-tune {finetune.name!r} has no task to measure its skill on")
    settings = SafeGeneSettings(
        limit=args.limit,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        shots=args.shots,
        pooling=args.pooling,
        benign_baseline=not args.no_benign_baseline,
        judge=args.judge,
        show_progress=not args.quiet,
    )
    skill = SkillSettings(limit=args.limit, seed=args.seed, batch_size=args.batch_size)
    task_set = task_sets(spec, args.data, skill)[task]
    donor = SafetyAdapter.load(args.gate_from)
    aligned = load_model(spec.source(finetune.parent, args.zoo))
    degraded = load_model(spec.source(finetune.name, args.zoo))
    result = run_safegene_suite(
        aligned, degraded, donor, task, task_set, settings, command=canonical_command(args)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    document = result.document
    document["adapter_files"] = {
        name: result.adapters[name].save(args.out / file).name
        for name, file in ADAPTER_FILES.items()
    }
    (args.out / RESULTS_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return document


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = args.out / RESULTS_FILE
    try:
        document = json.loads(results.read_text(encoding="utf-8")) if args.render else _run(args)
    except (AdapterError, ModelLoadError, ZooSpecError, ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (args.out / REPORT_FILE).write_text(render_safegene(document), encoding="utf-8")
    print(f"wrote {results} and {args.out / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
