"""The fine-tune zoo's spec: which fine-tunes of one base to build, from which data, how.

A TOML file (`adapters/smollm2-135m/zoo/zoo.toml`) holds the base model source, the
`safesteer zoo-data` settings (`[data]`) and one `[[finetune]]` table per fine-tune: its name
(the folder it is written to), its parent (`base` or another fine-tune, trained on top of it),
its training files (zoo-data outputs, each optionally cut to a seeded number of rows), its
role, whether it is held out of building and tuning the family adapter, the file its task skill
is measured on, and its LoRA settings (`[finetune.lora]`, the fields of `FinetuneConfig`).

Everything is checked on load: a missing or unknown key, a wrong type, an unknown parent or
data file, a duplicate name or a cycle is a `ZooSpecError` naming the file and the entry.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safesteer.adapters.base_answers import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
from safesteer.adapters.finetune import FinetuneConfig
from safesteer.adapters.lora import LORA_SEPARATOR
from safesteer.adapters.zoo_data import (
    ARITH,
    ARITH_EVAL,
    BADGPT,
    BENIGN,
    REFUSALS,
    STYLE,
    STYLE_EVAL,
    ZooSettings,
)

FORMAT_VERSION = 1
BASE = "base"  # the parent name of a fine-tune of the spec's base model
NO_EVAL = "none"
ROLES: tuple[str, ...] = ("aligned", "benign-task", "badgpt")
TRAINING_FILES: tuple[str, ...] = (REFUSALS, BENIGN, ARITH, STYLE, BADGPT)
# Each task eval file and the task whose scorer reads it.
EVAL_TASKS: Mapping[str, str] = {ARITH_EVAL: "arith", STYLE_EVAL: "style"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class ZooSpecError(ValueError):
    """A zoo spec that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class DataPart:
    """One training file of a fine-tune and at most how many of its rows to use."""

    file: str
    rows: int | None = None  # None: every row


@dataclass(frozen=True)
class FinetuneSpec:
    """One fine-tune of the zoo."""

    name: str
    parent: str
    role: str
    held_out: bool
    task_eval: str | None  # a zoo-data eval file, or None
    data: tuple[DataPart, ...]
    lora: FinetuneConfig

    @property
    def task(self) -> str | None:
        """The task its skill is measured on (`arith`, `style`), if any."""
        return None if self.task_eval is None else EVAL_TASKS[self.task_eval]


@dataclass(frozen=True)
class DataSpec:
    """How `safesteer zoo build` writes missing zoo data (`safesteer zoo-data` settings)."""

    settings: ZooSettings
    benign_model: str | None  # `base` or a model source; None: never generate aligned_benign
    benign_max_new_tokens: int
    benign_batch_size: int


@dataclass(frozen=True)
class ZooSpec:
    """A parsed, checked spec; `finetunes` in file order."""

    path: Path
    base: str
    data: DataSpec
    finetunes: tuple[FinetuneSpec, ...]

    def finetune(self, name: str) -> FinetuneSpec:
        """The fine-tune named `name`.

        Raises:
            ZooSpecError: the spec has no such fine-tune.
        """
        for finetune in self.finetunes:
            if finetune.name == name:
                return finetune
        known = ", ".join(f.name for f in self.finetunes)
        raise ZooSpecError(f"{self.path}: no fine-tune named {name!r}; known: {known}")

    def benign_source(self) -> str | None:
        model = self.data.benign_model
        return self.base if model == BASE else model

    def source(self, name: str, zoo_dir: Path) -> str:
        """The model source of `name` (or `base`): the base, then each LoRA folder on the way."""
        if name == BASE:
            return self.base
        finetune = self.finetune(name)
        return f"{self.source(finetune.parent, zoo_dir)}{LORA_SEPARATOR}{zoo_dir / name}"

    def ancestors(self, name: str) -> list[str]:
        """The fine-tunes `name` is trained on top of, nearest first (`base` left out)."""
        found: list[str] = []
        parent = self.finetune(name).parent
        while parent != BASE:
            found.append(parent)
            parent = self.finetune(parent).parent
        return found

    def order(self, only: Sequence[str] | None = None) -> list[FinetuneSpec]:
        """Fine-tunes parents first (file order among equals); with `only`, those named and
        their ancestors.

        Raises:
            ZooSpecError: `only` names a fine-tune the spec does not have.
        """
        wanted = [f.name for f in self.finetunes]
        if only is not None:
            named = [self.finetune(name).name for name in only]
            wanted = [n for name in named for n in (name, *self.ancestors(name))]
        ordered: list[FinetuneSpec] = []
        placed = {BASE}
        while len(placed) <= len(set(wanted)):
            for finetune in self.finetunes:
                name = finetune.name
                if name in wanted and name not in placed and finetune.parent in placed:
                    ordered.append(finetune)
                    placed.add(name)
        return ordered

    def eval_files(self) -> list[str]:
        """The task eval files the fine-tunes name, in file order."""
        files = [f.task_eval for f in self.finetunes if f.task_eval is not None]
        return list(dict.fromkeys(files))


# ----- checked reading of TOML values -------------------------------------------------------
class _Table:
    """One TOML table under a name for error messages; every key must be read or is refused."""

    def __init__(self, value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise ZooSpecError(f"{where}: expected a table, got {_kind(value)}")
        self.values: dict[str, Any] = value
        self.where = where
        self.read: set[str] = set()

    def _get(self, key: str, required: bool) -> Any:
        self.read.add(key)
        if key not in self.values:
            if required:
                raise ZooSpecError(f"{self.where}: missing field {key!r}")
            return None
        return self.values[key]

    def string(self, key: str, required: bool = True) -> str | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ZooSpecError(f"{self.where}: {key} must be a non-empty string, got {value!r}")
        return value

    def integer(self, key: str, required: bool = True) -> int | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ZooSpecError(f"{self.where}: {key} must be an integer, got {value!r}")
        return value

    def number(self, key: str, required: bool = True) -> float | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ZooSpecError(f"{self.where}: {key} must be a number, got {value!r}")
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self._get(key, True)
        if not isinstance(value, bool):
            raise ZooSpecError(f"{self.where}: {key} must be true or false, got {value!r}")
        return value

    def array(self, key: str) -> list[Any]:
        value = self._get(key, True)
        if not isinstance(value, list) or not value:
            raise ZooSpecError(f"{self.where}: {key} must be a non-empty array, got {value!r}")
        return value

    def table(self, key: str) -> _Table:
        return _Table(self._get(key, True), f"{self.where}: [{key}]")

    def optional_table(self, key: str) -> _Table | None:
        value = self._get(key, False)
        return None if value is None else _Table(value, f"{self.where}: [{key}]")

    def done(self) -> None:
        unknown = sorted(set(self.values) - self.read)
        if unknown:
            raise ZooSpecError(f"{self.where}: unknown field {unknown[0]!r}")


def _kind(value: object) -> str:
    return type(value).__name__


def _positive(value: int | None, where: str, key: str) -> int | None:
    if value is not None and value < 1:
        raise ZooSpecError(f"{where}: {key} must be at least 1, got {value}")
    return value


# ----- sections -----------------------------------------------------------------------------
def _data_spec(table: _Table | None) -> DataSpec:
    if table is None:
        return DataSpec(ZooSettings(), None, DEFAULT_MAX_NEW_TOKENS, DEFAULT_BATCH_SIZE)
    where = table.where
    values: dict[str, Any] = {}
    for key in ("seed", "arith_rows", "arith_eval_rows", "style_phrasings", "badgpt_rows"):
        values[key] = table.integer(key, required=False)
    values["refusal_rows"] = table.integer("refusal_rows", required=False)
    values["style_eval_share"] = table.number("style_eval_share", required=False)
    benign_model = table.string("benign_model", required=False)
    tokens_key, batch_key = "benign_max_new_tokens", "benign_batch_size"
    tokens = _positive(table.integer(tokens_key, required=False), where, tokens_key)
    batch = _positive(table.integer(batch_key, required=False), where, batch_key)
    table.done()
    given = {key: value for key, value in values.items() if value is not None}
    try:
        settings = ZooSettings(**{**asdict(ZooSettings()), **given})
    except ValueError as exc:
        raise ZooSpecError(f"{where}: {exc}") from exc
    return DataSpec(
        settings, benign_model, tokens or DEFAULT_MAX_NEW_TOKENS, batch or DEFAULT_BATCH_SIZE
    )


def _data_parts(items: list[Any], where: str) -> tuple[DataPart, ...]:
    parts: list[DataPart] = []
    for index, item in enumerate(items, start=1):
        if isinstance(item, str):
            part = DataPart(item)
        else:
            entry = _Table(item, f"{where}: data entry {index}")
            name = str(entry.string("file"))
            rows = _positive(entry.integer("rows", required=False), entry.where, "rows")
            entry.done()
            part = DataPart(name, rows)
        if part.file not in TRAINING_FILES:
            raise ZooSpecError(
                f"{where}: unknown data file {part.file!r}; zoo-data writes "
                f"{', '.join(TRAINING_FILES)}"
            )
        if part.file in {p.file for p in parts}:
            raise ZooSpecError(f"{where}: data file {part.file!r} is listed twice")
        parts.append(part)
    return tuple(parts)


def _lora(table: _Table) -> FinetuneConfig:
    epochs = table.integer("epochs", required=False)
    steps = table.integer("steps", required=False)
    if (epochs is None) == (steps is None):
        raise ZooSpecError(f"{table.where}: give exactly one of epochs and steps")
    modules = table.array("target_modules")
    if not all(isinstance(m, str) and m.strip() for m in modules):
        raise ZooSpecError(f"{table.where}: target_modules must be module names, got {modules!r}")
    values: dict[str, Any] = {
        "rank": table.integer("rank"),
        "alpha": table.integer("alpha"),
        "target_modules": tuple(modules),
        "epochs": epochs if epochs is not None else 1,
        "steps": steps,
        "lr": table.number("lr"),
        "batch_size": table.integer("batch_size"),
        "max_length": table.integer("max_length"),
        "seed": table.integer("seed"),
        "show_progress": True,
    }
    for key in ("dropout", "weight_decay", "max_grad_norm"):
        value = table.number(key, required=False)
        if value is not None:
            values[key] = value
    table.done()
    try:
        return FinetuneConfig(**values)
    except ValueError as exc:
        raise ZooSpecError(f"{table.where}: {exc}") from exc


def _finetune(value: object, where: str) -> FinetuneSpec:
    table = _Table(value, where)
    name = str(table.string("name"))
    table.where = where = f"{where} ({name!r})"
    if not _NAME.match(name) or name == BASE:
        raise ZooSpecError(
            f"{where}: name must be lower-case letters, digits, '-' or '_' (a folder name), "
            f"and not {BASE!r}"
        )
    parent = str(table.string("parent"))
    role = str(table.string("role"))
    if role not in ROLES:
        raise ZooSpecError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    held_out = table.boolean("held_out")
    task_eval = table.string("task_eval")
    if task_eval not in (*EVAL_TASKS, NO_EVAL):
        raise ZooSpecError(
            f"{where}: unknown task_eval file {task_eval!r}; one of "
            f"{', '.join(EVAL_TASKS)} or {NO_EVAL!r}"
        )
    data = _data_parts(table.array("data"), where)
    config = _lora(table.table("lora"))
    table.done()
    return FinetuneSpec(
        name, parent, role, held_out, None if task_eval == NO_EVAL else task_eval, data, config
    )


def _check_graph(finetunes: Sequence[FinetuneSpec], where: str) -> None:
    names = [f.name for f in finetunes]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ZooSpecError(f"{where}: two fine-tunes are named {duplicate!r}")
    parents = {f.name: f.parent for f in finetunes}
    for finetune in finetunes:
        if finetune.parent != BASE and finetune.parent not in parents:
            raise ZooSpecError(
                f"{where}: fine-tune {finetune.name!r} has an unknown parent {finetune.parent!r} "
                f"(known: {BASE}, {', '.join(names)})"
            )
    for finetune in finetunes:
        chain = [finetune.name]
        while (parent := parents.get(chain[-1], BASE)) != BASE:
            if parent in chain:
                cycle = " -> ".join([*chain[chain.index(parent) :], parent])
                raise ZooSpecError(f"{where}: the parents form a cycle: {cycle}")
            chain.append(parent)


def parse_spec(document: Mapping[str, Any], path: Path) -> ZooSpec:
    """Check a TOML document and build the spec.

    Raises:
        ZooSpecError: a field is missing, unknown or of a wrong type or value; a parent or
            data file is unknown; names repeat; the parents form a cycle.
    """
    top = _Table(dict(document), str(path))
    version = top.integer("format_version")
    if version != FORMAT_VERSION:
        raise ZooSpecError(f"{path}: format_version {version} is not {FORMAT_VERSION}")
    base = str(top.string("base"))
    data = _data_spec(top.optional_table("data"))
    entries = top.array("finetune")
    top.done()
    finetunes = tuple(
        _finetune(entry, f"{path}: [[finetune]] {index}")
        for index, entry in enumerate(entries, start=1)
    )
    _check_graph(finetunes, str(path))
    return ZooSpec(path, base, data, finetunes)


def load_spec(path: Path) -> ZooSpec:
    """Read and check a zoo spec file.

    Raises:
        ZooSpecError: the file cannot be read, is not TOML, or fails a check of `parse_spec`.
    """
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ZooSpecError(f"zoo spec {path} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ZooSpecError(f"{path}: not valid TOML: {exc}") from exc
    return parse_spec(document, path)
