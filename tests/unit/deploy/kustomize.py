"""deploy/k8s as `kubectl apply -k` sees it: built by the real kustomize.

`make setup` builds the pinned kustomize into .tally/bin (Makefile). The build
runs on a copy of deploy/k8s with secrets.env made from secrets.env.example, as
an operator's checkout has it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "deploy" / "k8s"
KUSTOMIZE = Path(os.environ.get("TALLY_KUSTOMIZE", REPO / ".tally" / "bin" / "kustomize"))


def kustomize_build(source: Path = K8S) -> str:
    """The YAML stream `kustomize build` prints for `source` (a copy is built)."""
    if not KUSTOMIZE.exists():
        raise AssertionError(f"{KUSTOMIZE} is missing: run `make test-tools` (it builds kustomize)")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "k8s"
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("secrets.env"))
        shutil.copy(copy / "secrets.env.example", copy / "secrets.env")
        done = subprocess.run(
            [str(KUSTOMIZE), "build", str(copy)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"kustomize build failed: {done.stderr.strip()}")
    return done.stdout
