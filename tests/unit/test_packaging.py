"""The wheel ships every subpackage: pyproject's explicit package list matches the tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(top).parts)
        for top in (ROOT / "adapters", ROOT / "server")
        for init in top.glob("safesteer/**/__init__.py")
    }
    assert found == listed
    for package in listed:
        assert (ROOT / config["package-dir"][package]).is_dir()
