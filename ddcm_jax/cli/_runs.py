"""One command's bookkeeping: its inputs (`Job`, `_expand`, `_read_limited`), progress bars, failures,
the JSON summary, the exit code (`Run`), and the multi-host helpers."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ddcm_jax.printable import printable


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class InputError(Exception):
    """One input failed; the message already names it."""


@dataclasses.dataclass(frozen=True)
class Job:
    source: Path
    stem: Path  # output path without suffix


def _expand(inputs: Sequence[Path], outdir: Path, suffixes: set[str]) -> tuple[list[Job], list[str]]:
    """Files and folders (recursive, mirrored under outdir) -> jobs; missing inputs -> errors."""
    jobs, errors = [], []
    for inp in inputs:
        if inp.is_dir():
            found = sorted(p for p in inp.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                           and not any(part.startswith(".") for part in p.relative_to(inp).parts))  # fmt: skip
            if not found:
                errors.append(f"{inp}: no {'/'.join(sorted(suffixes))} files in this folder")
            jobs += [Job(p, outdir / p.relative_to(inp).with_suffix("")) for p in found]
        elif inp.is_file():
            jobs.append(Job(inp, outdir / inp.stem))
        elif inp.exists():
            errors.append(f"{inp}: not a regular file")
        else:
            errors.append(f"{inp}: no such file or folder")
    return jobs, errors


def _read_limited(path: Path) -> bytes:
    """The bytes of a regular file of at most `LIMITS["file_bytes"]`; anything else refused in one line.

    A FIFO, a device (/dev/zero) or a directory is refused before a byte is read (the
    open does not block: O_NONBLOCK), and at most the limit plus one byte is ever read.
    """
    import os
    import stat

    from ddcm_jax.bitstream import LIMITS

    limit, name = LIMITS["file_bytes"], printable(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InputError(f"{name}: cannot open ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{name}: not a regular file")
        if st.st_size > limit:
            raise InputError(f"{name}: {st.st_size} bytes is larger than any valid .ddcm file")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputError(f"{name}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew after the size was read
        raise InputError(f"{name}: more than {limit} bytes, larger than any valid .ddcm file")
    return data


class Run:
    """One command's bookkeeping: progress bars, failures, the JSON summary, the exit code."""

    def __init__(self, command: str, args: argparse.Namespace, total: int) -> None:
        self.command, self.args = command, args
        self.failed = 0
        self._unfinished_failures = 0  # failed inputs whose done() has not come yet
        self.records: list[dict[str, Any]] = []
        self.claimed: dict[Path, Path] = {}
        self.protected: set[Path] = set()
        self.protected_inodes: set[tuple[int, int]] = set()
        self.bar = self._bar(total, command, "img")

    def protect(self, paths: Iterable[Path]) -> None:
        """Files that no output may replace: the inputs (by resolved path and by inode, for hard links)."""
        for path in paths:
            self.protected.add(path.resolve())
            with contextlib.suppress(OSError):
                st = path.stat()
                self.protected_inodes.add((st.st_dev, st.st_ino))

    def _bar(self, total: int, desc: str, unit: str, leave: bool = True) -> Any:
        if self.args.quiet or _process_index() != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True)

    def say(self, line: str) -> None:
        if not self.args.quiet:
            (self.bar.write if self.bar is not None else print)(printable(line))

    def fail(self, where: Path | str, e: BaseException) -> None:
        """Report one failed input: the error's own line if it names the input, else prefixed."""
        if _interrupted(self.args):  # a library that turned Ctrl-C into its own error
            raise KeyboardInterrupt
        if self.args.debug:
            raise e
        expected = isinstance(e, InputError | ValueError | OSError)
        # Names from the file system may hold newlines: escape them before taking the first line.
        text, named = str(e), str(where) in str(e)
        if named:
            text = text.replace(str(where), printable(where))
        msg = text.splitlines()[0] if text else ""
        if not expected:
            msg = f"{type(e).__name__}: {msg} (run with --debug for a traceback)"
        self.error(msg if named else f"{printable(where)}: {msg}")

    def error(self, line: str) -> None:
        self.failed += 1
        self._unfinished_failures += 1
        msg = f"ddcm {self.command}: {printable(line)}"
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def claim(self, out: Path, source: Path) -> None:
        """Refuse two inputs that would write the same output file."""
        key = out.resolve()
        if key in self.protected or _inode(out) in self.protected_inodes:
            raise InputError(f"{source}: its output {out} would replace an input file; choose another -o")
        if key in self.claimed:
            raise InputError(f"{source}: would overwrite {out}, already written for {self.claimed[key]}")
        if out.is_dir() and not out.is_symlink():  # found now, not after the encoding
            raise InputError(f"{source}: its output {out} is a folder, not a file")
        if os.path.lexists(out) and not vars(self.args).get("overwrite", False):  # never lose a file unasked
            raise InputError(f"{source}: its output {out} exists; give --overwrite to replace it, or another -o")
        self.claimed[key] = source

    @contextlib.contextmanager
    def steps(self, what: str) -> Iterator[Any]:
        """A per-step bar named `what` ("encode", "decode", ...): yields the codec's `progress(done, total)`.

        The first step's call compiles the programs (or loads them from the
        persistent cache): shown as such, and left out of the rate and ETA.
        """
        bar = self._bar(0, what, "step", leave=False)
        if bar is None:
            yield None
            return

        def progress(done: int, total: int) -> None:
            if done == 0:
                bar.reset(total=total)
                bar.set_postfix_str("compiling the first step", refresh=True)
            elif done == 1:  # restart the clock: the rate counts the steps after the compiled one
                bar.reset(total=total)
                bar.initial = bar.n = 1
                bar.set_postfix_str("", refresh=True)
            else:
                bar.update(done - bar.n)

        try:
            yield progress
        finally:
            bar.close()

    def done(self) -> None:
        """One input finished: counted in the bar, unless it failed (then it leaves the bar's total)."""
        if self.bar is None:
            return
        if self._unfinished_failures:
            self._unfinished_failures -= 1
            self.bar.total -= 1
            self.bar.set_postfix_str(f"{self.failed} failed", refresh=True)
        else:
            self.bar.update(1)

    def finish(self) -> int:
        if self.bar is not None:
            self.bar.close()
        summary = {"command": self.command, "failed": self.failed, "items": self.records}
        if _process_count() > 1:
            summary = _merge_summaries(summary)
        if self.args.json is not None and _process_index() == 0:
            from ddcm_jax.images import write_report

            report = (json.dumps(summary, indent=2, allow_nan=False, default=_jsonable) + "\n").encode()
            try:
                write_report(self.args.json, report)
            except OSError as e:  # a full disk, a folder gone: name the report, not just the errno
                print(f"ddcm {self.command}: --json {printable(self.args.json)}: {e.strerror or e}", file=sys.stderr)
                return 1
        return 1 if summary["failed"] else 0


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _interrupted(args: argparse.Namespace) -> bool:
    flag = getattr(args, "interrupted", None)
    return flag is not None and flag.is_set()


def _process_count() -> int:
    import jax

    return jax.process_count()


def _process_index() -> int:
    import jax

    return jax.process_index()


def _merge_summaries(summary: dict[str, Any]) -> dict[str, Any]:
    """Every process's summary, gathered over the network (no shared filesystem needed)."""
    from ddcm_jax.parallel import gather_json

    merged = gather_json(summary, default=_jsonable)
    return {"command": summary["command"], "processes": len(merged), "failed": sum(m["failed"] for m in merged),
            "items": [item for m in merged for item in m["items"]]}  # fmt: skip


def _init_distributed(args: argparse.Namespace) -> None:
    """Join a multi-process run if asked to; afterwards jax.process_count() tells."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    if not args.distributed and any(v is None for v in explicit):
        raise UsageError("give --coordinator, --num-processes and --process-id together (or --distributed)")
    import jax

    # Cross-process collectives on CPU need gloo; it does not affect GPU or TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.distributed:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)  # fmt: skip


def _my_share(items: list[Any]) -> list[Any]:
    """This process's inputs: every process_count-th item, starting at its index."""
    return items[_process_index() :: _process_count()]


def _groups(items: list[Any], key: Callable[[Any], Any], size: int) -> Iterator[list[Any]]:
    """Consecutive runs of up to `size` items sharing key(item), in input order."""
    buckets: dict[Any, list[Any]] = {}
    for item in items:
        b = buckets.setdefault(key(item), [])
        b.append(item)
        if len(b) == size:
            yield buckets.pop(key(item))
    yield from buckets.values()


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    raise TypeError(type(v).__name__)


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(v, 4)
