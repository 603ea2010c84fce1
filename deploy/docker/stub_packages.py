"""Create empty package folders for every package pyproject.toml lists.

The image's dependency layer installs the project from pyproject.toml alone (so that editing
the source does not reinstall the dependencies); setuptools wants each listed package's
folder to exist, so this makes them, following [tool.setuptools.package-dir].
"""

import tomllib
from pathlib import Path

setuptools = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]
package_dir: dict[str, str] = setuptools.get("package-dir", {})
for package in setuptools.get("packages", []):
    parts = package.split(".")
    for cut in range(len(parts), -1, -1):  # the nearest mapped parent decides the folder
        parent = ".".join(parts[:cut])
        if parent in package_dir or cut == 0:
            base = Path(package_dir.get(parent, ""))
            Path(base, *parts[cut:]).mkdir(parents=True, exist_ok=True)
            break
Path("README.md").touch()
