"""The locks agree with pyproject.toml and with each other (`make lock` writes both).

requirements.lock pins every Python dependency for `make setup` (dev and bench tools
included); deploy/requirements.lock pins the image's runtime dependencies, compiled
with the first as a constraint. A dependency added to pyproject.toml without `make
lock` fails here before it fails on a fresh machine.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)", re.MULTILINE)


def _name(requirement: str) -> str:
    bare = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", bare).lower()


def _pins(path: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, version in PIN.findall(path.read_text()):
        found.setdefault(_name(name), set()).add(version)
    return found


def test_every_dependency_is_locked_with_a_hash() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for group in project["optional-dependencies"].values() for r in group}
    full, image = _pins(ROOT / "requirements.lock"), _pins(ROOT / "deploy/requirements.lock")
    assert runtime | extras <= set(full), sorted((runtime | extras) - set(full))
    assert runtime <= set(image), sorted(runtime - set(image))
    for path in (ROOT / "requirements.lock", ROOT / "deploy/requirements.lock"):
        lines = path.read_text().splitlines()
        unhashed = [
            line
            for line, after in zip(lines, [*lines[1:], ""], strict=True)
            if PIN.match(line) and not after.startswith("    --hash=sha256:")
        ]
        assert unhashed == [], path


def test_the_image_takes_the_versions_of_the_full_lock() -> None:
    full, image = _pins(ROOT / "requirements.lock"), _pins(ROOT / "deploy/requirements.lock")
    differ = {name: (versions, full.get(name)) for name, versions in image.items()}
    assert {n: v for n, v in differ.items() if not v[0] <= (v[1] or set())} == {}
