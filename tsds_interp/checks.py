"""Value rules shared by the library and the command-line tools.

Every rule raises ``ValueError`` with one line that names the setting, the accepted range and the
value given; the CLIs use the same functions (through :mod:`tsds_interp.cli`), so a flag and the
library argument it feeds fail with the same words.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

MAX_SEED = 2**32 - 1


def number(name: str, value, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           integer: bool = False):
    """``value`` if it is a finite number (an integer when ``integer``) within ``[lo, hi]``
    (``(lo, hi]`` when ``lo_open``); else ``ValueError`` naming ``name``."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an integer{_bounds(lo, hi, lo_open)}, got {value!r}")
    if not integer and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"{name} must be a number{_bounds(lo, hi, lo_open)}, got {value!r}")
    bad = not math.isfinite(value)
    bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
    bad = bad or (hi is not None and value > hi)
    if bad:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind}{_bounds(lo, hi, lo_open)}, got {value!r}")
    return value


def token_ids(tokens, vocab: int | None = None, name: str = "tokens") -> torch.Tensor:
    """``tokens`` as a non-empty ``[batch, pos]`` long tensor of ids in ``0 .. vocab - 1`` (with a
    ``vocab``; without one, of non-negative ids)."""
    if not isinstance(tokens, torch.Tensor):
        try:
            tokens = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a [batch, pos] table of integer token ids") from None
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got {tokens.dtype}")
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise ValueError(f"{name} must be a non-empty [batch, pos] table of token ids, got shape {tuple(tokens.shape)}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or (vocab is not None and high >= vocab):
        allowed = "token ids are non-negative" if vocab is None else f"the model's vocabulary is 0..{vocab - 1}"
        raise ValueError(f"{name} hold id {low if low < 0 else high}; {allowed}")
    return tokens.long()


def contrast(model, clean, corrupted, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two token batches, checked: token ids of the model's vocabulary, one shape, a known
    ``direction``; else ``ValueError``."""
    vocab = model.cfg.d_vocab
    clean = token_ids(clean, vocab, "clean tokens")
    corrupted = token_ids(corrupted, vocab, "corrupted tokens")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} tokens "
                         "must have the same shape")
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    device = next(model.parameters()).device
    return clean.to(device), corrupted.to(device)


def metric(fn, differentiable: bool = False):
    """``fn`` wrapped so that each output is checked: one finite number, as a tensor (and one that
    carries a gradient when ``differentiable``: attribution patching needs it)."""
    if not callable(fn):
        raise ValueError(f"metric must be a function of the logits returning one number, got {type(fn).__name__}")

    def checked(logits: torch.Tensor) -> torch.Tensor:
        value = fn(logits)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"the metric must return a tensor computed from the logits, got {type(value).__name__}")
        if value.numel() != 1:
            raise ValueError(f"the metric must return one number (e.g. a mean over the batch), got shape "
                             f"{tuple(value.shape)}")
        if not torch.isfinite(value.detach()).all():
            raise ValueError(f"the metric returned {value.item()}; it must be finite")
        if differentiable and not value.requires_grad:
            raise ValueError("the metric must be differentiable in the logits (attribution patching takes its "
                             "gradient); it returned a tensor without one")
        return value.reshape(())
    return checked


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _bounds(lo, hi, lo_open) -> str:
    left = None if lo is None else f"{'>' if lo_open else '>='} {_fmt(lo)}"
    right = None if hi is None else f"<= {_fmt(hi)}"
    if left and right:
        return f" {'in (' if lo_open else 'in ['}{_fmt(lo)}, {_fmt(hi)}]"
    return f" {left or right}" if (left or right) else ""


def seed(value, name: str = "seed") -> int:
    return number(name, value, lo=0, hi=MAX_SEED, integer=True)


def device(name: str, flag: str = "device") -> torch.device:
    """A device this machine has: ``cpu``, ``cuda``/``cuda:N`` with CUDA, ``mps`` on Apple silicon."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{flag} {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise ValueError(f"{flag} {name!r}: the CPU has no device index; use cpu")
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {name!r}: CUDA is not available on this machine; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {name!r}: MPS is not available on this machine; use cpu")
        return dev
    raise ValueError(f"{flag} {name!r} is not supported; use cpu, cuda, cuda:N or mps")


def _nearest_existing(path: Path) -> Path:
    """``path`` or the nearest folder above it that exists (a link counts, even one to nowhere)."""
    path = path.absolute()
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path


PACKAGE_CHECKPOINTS = Path(__file__).parent / "checkpoints"


def _owner(path: Path) -> tuple[Path, str] | None:
    """The folder at or above ``path`` that already owns it, and what it is: a model checkpoint,
    the shipped package or a training stage."""
    path = path.absolute()
    for folder in (path, *path.parents):
        if folder == PACKAGE_CHECKPOINTS.absolute():
            return folder, "holds the shipped checkpoints"
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder, "is a model checkpoint"
        if (folder / "checkpoint").is_dir() and (folder / "run.json").is_file():
            return folder, "is a training stage folder"
    return None


def out_dir(path: str | os.PathLike, flag: str = "out", stage: bool = False) -> Path:
    """A folder that is, or can be created as, a writable folder that belongs to no checkpoint, no
    training stage (unless ``stage``: the training stage itself may be its own output) and not the
    shipped package (nothing is created here)."""
    path = writable_dir(path, flag)
    owner = _owner(path)
    if owner and not (stage and owner == (path.absolute(), "is a training stage folder")):
        raise ValueError(f"{flag} {path}: {owner[0]} {owner[1]}, whose files this would overwrite; give a fresh folder")
    return path


def writable_dir(path: str | os.PathLike, flag: str = "out") -> Path:
    """A folder that is, or can be created as, a writable folder (nothing is created here)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder")
    base = _nearest_existing(path)
    if base.is_symlink() and not base.exists():
        raise ValueError(f"{flag} {path}: {base} is a link to {os.readlink(base)}, which does not exist; "
                         "give another folder")
    if not base.is_dir():
        raise ValueError(f"{flag} {path}: {base} is a file, so the folder cannot be created; give another folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {base} is not writable; give a folder you can write to")
    try:  # what the permission bits do not tell (/proc, /sys, a read-only mount): a nameless file, gone at once
        tempfile.TemporaryFile(dir=base).close()
    except OSError as e:
        raise ValueError(f"{flag} {path}: files cannot be created in {base} ({e.strerror}); "
                         "give a folder you can write to") from None
    return path


def out_file(path: str | os.PathLike, flag: str = "out") -> Path:
    """A file path whose folder is, or can be created as, writable; it must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    writable_dir(path.parent, flag)
    return path


def read_text(path: Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; ``ValueError`` naming the file when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; it is not a {what} written by tsds_interp") from None
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror})") from None


def read_json(path: Path, what: str = "file", kind: type = dict):
    """The JSON object in ``path``; ``ValueError`` naming the file when it is damaged."""
    try:
        value = json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); restore or delete it") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not a {kind.__name__}; restore or delete it")
    return value
