"""What every command-line tool shares: a parser whose errors are one line, flag types that check
ranges while parsing (before any model loads), and :func:`run`, which turns a bad input into one
``error:`` line and exit code 2 and Ctrl-C into one line and exit code 130, printed by one process
of a ``torchrun`` job only."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError

from tsds_interp import checks
from tsds_interp.checkpointing import FolderLock
from tsds_interp.provenance import run_versions

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130


class Parser(argparse.ArgumentParser):
    """``argparse`` with defaults shown in ``--help`` and errors on one line."""
    def __init__(self, prog: str, description: str):
        super().__init__(prog=prog, description=description,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def error(self, message: str):
        raise FlagError(f"{message} (see {self.prog} --help)")


class FlagError(ValueError):
    """A flag that does not parse or is out of range."""

def main(parser: argparse.ArgumentParser, body: Callable[..., int | None], argv: list[str] | None,
         tool: str | None = None) -> int:
    """Parse ``argv`` and run ``body`` on the flags under :func:`run`'s error handling; a ``tool`` that
    writes results gets its ``--out`` folder held as :class:`Results`, passed as ``body(args, results)``."""
    def call():
        args = parser.parse_args(argv)
        if tool is None:
            return body(args)
        with Results(args, tool) as results:
            return body(args, results)
    return run(call)


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job, or a single process (malformed ``RANK`` / ``WORLD_SIZE`` count as
    rank 0, so that the error about them is printed)."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return True
    return rank == 0 or not 0 <= rank < world


def say(line: str) -> None:
    """Print ``line`` to stderr from the first process only."""
    if is_main_process():
        print(line, file=sys.stderr)


def _flag_type(check: Callable, convert: type):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            kind = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)[str(e).index("must"):]) from None
    parse.__name__ = convert.__name__  # argparse names the type in its messages
    return parse


def integer(lo: int | None = None, hi: int | None = None):
    """Flag type: an integer in ``[lo, hi]``."""
    return _flag_type(lambda v: checks.number("value", v, lo=lo, hi=hi, integer=True), int)


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """Flag type: a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    return _flag_type(lambda v: checks.number("value", v, lo=lo, hi=hi, lo_open=lo_open), float)


SEED = integer(0, checks.MAX_SEED)


def _checked(check: Callable, doc: str):
    """Flag type from a :mod:`tsds_interp.checks` rule ``check(text, name)``; returns its value."""
    def parse(text: str):
        try:
            return check(text, "")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None
    parse.__doc__ = doc
    return parse


device = _checked(lambda text, name: str(checks.device(text, name)), "Flag type: a device this machine has.")
out_dir = _checked(checks.out_dir, "Flag type: a folder that can be written and belongs to no checkpoint, "
                   "training stage or the shipped package (nothing is created while parsing).")
stage_dir = _checked(lambda text, name: checks.out_dir(text, name, stage=True),
                     "Flag type: a training stage folder (new, or its own to resume).")
out_file = _checked(checks.out_file, "Flag type: a file whose folder can be written.")


def add_output(p: argparse.ArgumentParser, default: str, what: str = "output folder") -> None:
    """The flags of a tool's results folder: ``--out`` and ``--force``."""
    p.add_argument("--out", type=out_dir, default=default, help=what)
    p.add_argument("--force", action="store_true",
                   help="write into an --out that holds another tool's finished run, replacing that run")


class Results:
    """The ``--out`` folder of one run of ``tool``, held while the run lasts.

    Entered before any computation: a folder whose ``run.json`` records another tool's run (or none
    that says which) is refused unless ``args.force``, and a second writer is refused by
    :class:`~tsds_interp.checkpointing.FolderLock`. On success ``run.json`` is written last (the flags,
    :meth:`record`'s fields, the files this run wrote, versions), then the files the previous run there
    recorded and this one did not write are removed, so no stale result remains. A failed run keeps
    the previous run's files and record, and removes the folder again if it made it and left it empty."""

    def __init__(self, args: argparse.Namespace, tool: str):
        self.args, self.tool, self.out, self.fields = args, tool, Path(args.out), {}

    def __enter__(self) -> Results:
        previous = self._previous_record()
        owner = previous.get("tool", "an unknown tool") if previous is not None else self.tool
        if owner != self.tool and not self.args.force:
            raise ValueError(f"out {self.out} holds a finished run of {owner} (see its run.json); "
                             "pass --force to replace it or give a fresh folder")
        files = previous.get("files", []) if previous is not None else []
        self.previous_files = [f for f in files if isinstance(f, str) and f == Path(f).name]
        self.created = not self.out.exists()
        self.lock = FolderLock(self.out, doing="written into").__enter__()
        self.before = self._files()
        return self

    def record(self, **fields) -> None:
        """Fields for ``run.json`` besides the flags, the files and the versions."""
        self.fields.update(fields)

    def __exit__(self, error, *_) -> None:
        try:
            if error is None:
                self._write_record()
        finally:
            self.lock.__exit__()
            if error is not None and self.created and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()

    def _previous_record(self) -> dict | None:
        path = self.out / "run.json"
        return checks.read_json(path, "run record") if path.is_file() else None

    def _files(self) -> dict[str, tuple[int, int, int]]:
        """The results at the top of the folder (not the record, locks or subfolders), by identity."""
        return {f.name: (st.st_ino, st.st_mtime_ns, st.st_size) for f in self.out.iterdir()
                if f.name != "run.json" and not f.name.startswith(".") and f.is_file() and (st := f.stat())}

    def _write_record(self) -> None:
        written = sorted(name for name, ident in self._files().items() if self.before.get(name) != ident)
        record = {"tool": self.tool, **vars(self.args), "out": str(self.out), **self.fields, "files": written,
                  "versions": run_versions()}
        tmp = self.out / ".run.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, self.out / "run.json")
        for name in set(self.previous_files) - set(written):
            (self.out / name).unlink(missing_ok=True)


class _ClosedSafe(io.TextIOBase):
    """Standard output that survives its reader going away (``| head``: after a broken pipe, writes
    are dropped, so the run goes on to write its files) and a terminal whose encoding cannot show a
    character (a non-ASCII ``--out`` on an ASCII terminal: written as an escape)."""
    def __init__(self, stream):
        self.stream, self.broken = stream, False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except UnicodeEncodeError:
                encoding = self.stream.encoding or "ascii"
                self.write(text.encode(encoding, "backslashreplace").decode(encoding))
            except BrokenPipeError:
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self.broken = True

    def isatty(self) -> bool:
        return self.stream.isatty()


def run(body: Callable[[], int | None]) -> int:
    """Call ``body``; a ``ValueError`` (checkpoint errors included), ``OSError`` or
    ``FloatingPointError`` becomes ``error: ...`` and exit code 2, Ctrl-C exit code 130. A reader of
    standard output that goes away (``| head``) loses the rest of the printout, never the files."""
    stdout = sys.stdout
    if not isinstance(stdout, _ClosedSafe) and type(stdout).__module__ in ("_io", "io"):
        sys.stdout = _ClosedSafe(stdout)
    try:
        return _run(body)
    finally:
        if sys.stdout is not stdout and getattr(sys.stdout, "broken", False):
            try:  # point the interpreter's final flush at nowhere
                os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
            except (OSError, ValueError):
                pass
        sys.stdout = stdout


_HIDDEN_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _run(body: Callable[[], int | None]) -> int:
    """``body`` with its errors as one line each; the library's own warnings become one
    ``warning: ...`` line each after a run that succeeds (an error says all there is to say)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        status = _run_errors(body)
    for w in caught:
        if not w.category.__module__.startswith("tsds_interp"):
            if not issubclass(w.category, _HIDDEN_BY_DEFAULT):  # other libraries': as Python shows them
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        elif status == 0:
            say(f"warning: {_one_line(w.message)}")
    return status


def _run_errors(body: Callable[[], int | None]) -> int:
    try:
        return body() or 0
    except KeyboardInterrupt:
        say("interrupted; nothing more was written")
        return EXIT_INTERRUPTED
    except (ValueError, FloatingPointError) as e:
        say(f"error: {_one_line(e)}")
        return EXIT_BAD_INPUT
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        say(f"error: {e.strerror or e}{where}")
        return EXIT_BAD_INPUT
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(e):
            raise
        say(f"error: does not fit in memory ({_allocation(e)}); use smaller sizes, fewer questions or a "
            "smaller --max-batch / --memory-mb where the tool has one")
        return EXIT_BAD_INPUT
    except SafetensorError as e:  # storage errors while writing tensors (a full disk, a file-size limit)
        say(f"error: could not write or read tensors: {_one_line(e)}; check the disk space and limits")
        return EXIT_BAD_INPUT


def _out_of_memory(e: Exception) -> bool:
    """Python or torch out of memory (torch's CPU allocator says so in a plain ``RuntimeError``)."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def _allocation(e: Exception) -> str:
    """The size of the allocation that failed, as far as the error says."""
    size = re.search(r"allocate (\d+) bytes", str(e))
    return f"an allocation of {int(size[1]) / 2**30:.2f} GiB failed" if size else _one_line(e) or "out of memory"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
