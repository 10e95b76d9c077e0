"""The `ddcm` command line: compress, decompress, roundtrip, generate, restore, info, convert.

Exit codes: 0 every input done, 1 some input failed (each named on stderr in
one line, the others still processed), 2 usage error. Outputs are written
atomically, all of an input's outputs or none of them.

Only arguments, printing and exit codes live here: the presets and settings checks
are `ddcm_jax.presets`, the searches `ddcm_jax.rate`, the rest the library's.
`_parser` builds the parser and turns the flags into a spec, `_runs` keeps one
command's bookkeeping, `_commands` holds the commands. Importing this package
imports no JAX: `main` installs its SIGINT handler first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddcm_jax import interrupt
from ddcm_jax.cli._commands import COMMANDS
from ddcm_jax.cli._parser import _check_paths, _check_text, build_parser
from ddcm_jax.cli._runs import InputError, UsageError
from ddcm_jax.cli._runs import _read_limited as _read_limited  # the tests' name for it
from ddcm_jax.printable import printable

__all__ = ["InputError", "UsageError", "build_parser", "compile_cache_dir", "describe", "main"]


def __getattr__(name: str) -> Any:
    if name == "describe":  # the codec's (which imports JAX): imported when first asked for
        from ddcm_jax.codec import describe

        return describe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_model(path: Path) -> Any:
    """The model the commands load (every command looks it up here, at each call)."""
    from ddcm_jax.families import load_model

    return load_model(path)  # "default" resolves to the packaged model


def _exit_interrupted(command: str) -> int:
    """Ctrl-C: say so and leave at once.

    Running XLA computations (and their host callbacks) may still be alive in other
    threads; tearing the interpreter down under them crashed with SIGSEGV in about half
    of the tries. Every output is committed atomically, a commit under way finishes first
    and the temporaries of unfinished writes are removed here (ddcm_jax.interrupt), so
    skipping the interpreter's teardown loses nothing.
    """
    interrupt.remove_own_temporaries()
    print(f"ddcm {command}: interrupted" if command else "ddcm: interrupted", file=sys.stderr)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(130)


def compile_cache_dir() -> Path | None:
    """Where the command line keeps XLA's compiled programs: $DDCM_COMPILE_CACHE, else
    $XDG_CACHE_HOME/ddcm_jax/xla (~/.cache/ddcm_jax/xla); None when DDCM_COMPILE_CACHE=0."""
    setting = os.environ.get("DDCM_COMPILE_CACHE", "")
    if setting.lower() in ("0", "off", "no", "false"):
        return None
    if setting:
        return Path(setting)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddcm_jax" / "xla"


def _enable_compile_cache() -> None:
    """JAX's persistent compilation cache, so that a second run skips XLA compilation (README)."""
    import jax

    path = compile_cache_dir()
    if path is None or jax.config.jax_compilation_cache_dir:  # off, or the caller set up its own
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # an unwritable cache folder only costs speed
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every program, the small eager ones too: about 160 of them, 3.5 s of compiling on each fresh start.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C stops at once, wherever it lands: while JAX imports (the parser below pulls it
    # in), in a computation, or in one of JAX's garbage-collector callbacks, where a
    # KeyboardInterrupt would be printed as "Exception ignored" and the run would go on.
    stop = _StopOnInterrupt.install()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command in ("convert", "train"):
            if stop is not None:  # these unwind their own staging folders on KeyboardInterrupt
                stop.uninstall()
                stop = None
            if args.command == "convert":
                from ddcm_jax.convert import run

                return run(args)
            from ddcm_jax.train import run as run_train

            return run_train(args)
        if stop is not None:
            stop.command = args.command
        args.interrupted = threading.Event() if stop is None else stop.event
        _enable_compile_cache()
        return _dispatch(parser, args)
    finally:
        if stop is not None:
            stop.uninstall()


class _StopOnInterrupt:
    """The command line's SIGINT handler: one line, exit 130, now.

    Installed only by a `main` running in the main thread over Python's default handler
    (a caller with its own handler keeps it). Outputs are safe: a commit that is renaming
    its files finishes (or rolls back) first, and the temporaries of unfinished writes are
    removed before the process ends (images.when_no_commit, images.remove_own_temporaries).
    """

    def __init__(self) -> None:
        self.command = ""
        self.event = threading.Event()

    @classmethod
    def install(cls) -> _StopOnInterrupt | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return None
        stop = cls()
        signal.signal(signal.SIGINT, stop.on_sigint)
        return stop

    def uninstall(self) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_sigint(self, signum: int, frame: Any) -> None:
        self.event.set()
        interrupt.when_no_commit(lambda: _exit_interrupted(self.command))


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        _check_paths(args)
        _check_text(args)
        return COMMANDS[args.command](args)
    except UsageError as e:
        vars(args).get("usage_parser", parser).error(printable(str(e)))  # the command's usage; exits with 2
    except KeyboardInterrupt:
        _exit_interrupted(args.command)
    except Exception as e:
        if args.interrupted.is_set():
            _exit_interrupted(args.command)
        if getattr(args, "debug", False):
            raise
        from ddcm_jax.model import ModelDirError

        reason = str(e) if isinstance(e, ModelDirError | ValueError | OSError) else f"{type(e).__name__}: {e}"
        print(f"ddcm {args.command}: {printable(reason.splitlines()[0] if reason else type(e).__name__)}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 2
