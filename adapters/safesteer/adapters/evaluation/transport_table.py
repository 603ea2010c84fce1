"""`python -m safesteer.adapters.evaluation.transport_table`: run the transport suite, write
its results.json and report.md (`transport_suite` says what is measured)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.calibrate_command import reference_source
from safesteer.adapters.errors import AdapterError, ModelLoadError
from safesteer.adapters.evaluation.judging import JudgeInfo
from safesteer.adapters.evaluation.transport_suite import (
    CONDITIONS,
    DEFAULT_LIMIT,
    DEFAULT_NATIVE_PROMPTS,
    TransportSuiteSettings,
    run_transport_suite,
)
from safesteer.adapters.loading import load_model

DEFAULT_SOURCE = Path("adapters/smollm2-135m/safety.safetensors")
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def _direction(name: str, direction: Mapping[str, Any], limit: int) -> list[str]:
    transported = direction["transported"]
    lines = [
        f"## {name}: measured on `{direction['measured_on']}`",
        "",
        f"Native adapter `{direction['native']['id']}`; transported adapter "
        f"`{transported['id']}`, layers {transported['layer_map']} (source -> target), maps' "
        f"held-out R^2 {transported['held_out_r2']}"
        + (
            ""
            if transported["gate"] is None
            else f", gate layer {transported['gate']['source_detection_layer']} -> "
            f"{transported['gate']['detection_layer']} (reverse map R^2 "
            f"{transported['gate']['reverse_map_held_out_r2']})"
        )
        + ".",
        "",
        f"| condition | harmful refused (of {limit}) | over-refusal (of {limit}) | edgy "
        "over-refusal | rows steered (harmful / benign) |",
        "|---|---|---|---|---|",
    ]
    for condition, _, _ in CONDITIONS:
        row = direction["conditions"][condition]
        steered = row["steered"]
        lines.append(
            f"| {condition} | {_pct(row['harmful_refusal'])} | {_pct(row['over_refusal'])} | "
            f"{_pct(row['over_refusal_edgy'])} | {steered['harmful']} / {steered['benign']} |"
        )
    cosine = direction["cosine"]
    layers = sorted({layer for row in cosine.values() for layer in row}, key=int)
    lines += [
        "",
        "Cosine of the transported and the native effective vectors:",
        "",
        "| category | " + " | ".join(f"layer {la}" for la in layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    lines += [
        f"| {c} | " + " | ".join(f"{row[la]:+.3f}" for la in layers) + " |"
        for c, row in cosine.items()
    ]
    return [*lines, ""]


def render_transport(document: Mapping[str, Any]) -> str:
    """The Markdown report of a transport suite's results document."""
    settings = document["settings"]
    limit = settings["limit"]
    judge = dict(document["judge"])
    lines = [
        "# Transport table: safety directions carried across model families",
        "",
        f"Source adapter `{document['source']['adapter']}` of `{document['source']['model']}` "
        f"({document['source']['family']}); other family: `{document['target']['model']}` "
        f"({document['target']['family']}). Each family's native adapter next to the other "
        "family's, carried over by ridge maps fitted on benign prompts only. Seeded subsets of "
        f"the test splits ({limit} harmful, {limit} benign prompts, seed {settings['seed']}), "
        f"greedy, {settings['max_new_tokens']} new tokens. The native adapter of the other "
        f"family is the source's recipe at the same relative depth, extracted on it from "
        f"{settings['native_prompts_per_category']} harmful fit prompts per category.",
        "",
        f"{JudgeInfo(**judge).line()}.",
        "",
        "Conditions: "
        + "; ".join(f"**{name}**: {text}" for name, text in document["conditions"].items())
        + ".",
        "",
    ]
    directions = document["directions"]
    lines += _direction("Forward", directions["forward"], limit)
    lines += _direction("Reverse", directions["reverse"], limit)
    files = ", ".join(f"`{f}`" for f in document.get("adapter_files", {}).values())
    lines += [f"Adapters written next to this report: {files}." if files else ""]
    lines += ["", f"Command: `{document['command']}`", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m safesteer.adapters.evaluation.transport_table",
        description="Carry a safety adapter into another model family and back (safesteer "
        "transport) and measure the carried vectors next to each family's native ones: harmful "
        "refusal and over-refusal on seeded test-split subsets, gated and always on, and the "
        "cosine of transported and native vectors. Writes results.json and report.md.",
    )
    add = parser.add_argument
    add("--source", type=Path, default=DEFAULT_SOURCE, help=f"(default {DEFAULT_SOURCE})")
    add(
        "--source-model",
        default=None,
        help="a model of the source adapter's family (default: the one its recipe names)",
    )
    add("--target-model", required=True, help="a model of another family")
    add(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"harmful and benign test prompts per family (default {DEFAULT_LIMIT})",
    )
    add(
        "--native-prompts",
        type=int,
        default=DEFAULT_NATIVE_PROMPTS,
        help="harmful fit "
        f"prompts per category for the target's native adapter (default {DEFAULT_NATIVE_PROMPTS})",
    )
    add("--max-new-tokens", type=int, default=64, help="greedy tokens per answer (default 64)")
    add("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    add("--judge", choices=("keyword", "embedding"), default="keyword", help="refusal judge")
    add("--seed", type=int, default=0, help="seed of the prompt subsets (default 0)")
    add(
        "--out",
        type=Path,
        required=True,
        help="folder for results.json, report.md and the "
        "three adapters made (the target's native one, both transported ones)",
    )
    add("--render", action="store_true", help="only render --out's results.json again")
    add("--quiet", action="store_true", help="no progress bars")
    return parser


def canonical_command(args: argparse.Namespace, source_model: str) -> str:
    parts = ["python", "-m", "safesteer.adapters.evaluation.transport_table"]
    parts += ["--source", str(args.source), "--source-model", source_model]
    parts += ["--target-model", args.target_model, "--limit", str(args.limit)]
    parts += ["--native-prompts", str(args.native_prompts)]
    parts += ["--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
    parts += ["--judge", args.judge, "--seed", str(args.seed), "--out", str(args.out)]
    return shlex.join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = args.out / RESULTS_FILE
    try:
        if args.render:
            document = json.loads(results.read_text(encoding="utf-8"))
        else:
            settings = TransportSuiteSettings(
                limit=args.limit,
                seed=args.seed,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                native_prompts_per_category=args.native_prompts,
                judge=args.judge,
                show_progress=not args.quiet,
            )
            source = SafetyAdapter.load(args.source)
            source_spec = args.source_model or reference_source(source, None)
            result = run_transport_suite(
                source,
                load_model(source_spec),
                load_model(args.target_model),
                settings,
                command=canonical_command(args, source_spec),
            )
            args.out.mkdir(parents=True, exist_ok=True)
            document = result.document
            document["adapter_files"] = {
                name: adapter.save(args.out / f"{name}.safetensors").name
                for name, adapter in result.adapters.items()
            }
            results.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    except (AdapterError, ModelLoadError, ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (args.out / REPORT_FILE).write_text(render_transport(document), encoding="utf-8")
    print(f"wrote {results} and {args.out / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
