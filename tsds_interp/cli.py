"""Argument checks shared by the command-line tools: one-line ``ValueError`` messages naming the flag."""

from __future__ import annotations

from pathlib import Path


def check_sampling_args(minimums: dict[str, tuple[float, float]], temperature: float, out: str) -> Path:
    """Each ``{flag: (value, lowest)}`` at least its lowest, ``temperature`` > 0, ``out`` not a file;
    returns ``out`` as a path."""
    for flag, (value, low) in minimums.items():
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file; give a folder")
    return path
