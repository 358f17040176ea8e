"""What a run record says about the code that made it: library versions and the git commit."""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import torch


def git_commit(start: Path = Path(__file__).parent) -> str | None:
    """The commit checked out in the repository holding ``start`` (read from ``.git``), or None."""
    for folder in (start, *start.parents):
        git = folder / ".git"
        if git.is_dir():
            try:
                head = (git / "HEAD").read_text().strip()
                if not head.startswith("ref: "):
                    return head or None
                ref = head[5:]
                if (git / ref).is_file():
                    return (git / ref).read_text().strip() or None
                packed = (git / "packed-refs").read_text() if (git / "packed-refs").is_file() else ""
                return next((line.split()[0] for line in packed.splitlines() if line.endswith(" " + ref)), None)
            except OSError:
                return None
    return None


def run_versions() -> dict:
    """Library versions and git commit, for run records."""
    return {"torch": torch.__version__, "transformer_lens": version("transformer-lens"),
            "python": sys.version.split()[0], "git_commit": git_commit()}
