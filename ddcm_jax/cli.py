"""The `ddcm` command line: compress, decompress, roundtrip, generate, restore, info, convert.

Exit codes: 0 every input done, 1 some input failed (each named on stderr in
one line, the others still processed), 2 usage error. Outputs are written
atomically, all of an input's outputs or none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ddcm_jax import interrupt
from ddcm_jax.printable import printable

DEFAULT_STEPS, DEFAULT_K = 50, 1024  # generate's (and an explicit --rule ddcm's) steps; every command's K

# `compress` / `roundtrip` operating points (turbo, K = 1024), measured on the Kodak images with the
# packaged model (README "Quality levels"): the coding size (fit policy), steps and atoms per step.
QUALITY = {
    "low": {"size": 160, "steps": 20, "atoms": 128},
    "medium": {"size": 192, "steps": 30, "atoms": 128},
    "high": {"size": 256, "steps": 40, "atoms": 64},
}
DEFAULT_QUALITY = "medium"
# `restore`: per task (coding size, steps, K), chosen so that the result agrees with the measurement.
RESTORE_DEFAULTS = {
    "colorization": {"size": 192, "steps": 30, "codebook_size": 1024, "atoms": 128},
    "super-resolution": {"size": 192, "steps": 30, "codebook_size": 1024, "atoms": 128},
    "inpainting": {"size": 192, "steps": 30, "codebook_size": 1024, "atoms": 128},
    "blur": {"size": 192, "steps": 30, "codebook_size": 1024, "atoms": 128},
}
# `restore --rule ddcm`: one atom per step (the DDCM paper's rule) needs many steps.
DDCM_RESTORE = {"steps": 100, "codebook_size": 256, "atoms": 1}
# Latent (Stable Diffusion) models: Turbo-DDCM's K, at T = 20 with M = 20 (its no-bits steps from its
# heuristic at the coded size); --rule ddcm keeps the original latent DDCM's T and K as given.
LATENT_DEFAULTS = {"steps": 20, "codebook_size": 16384, "atoms": 20}


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class InputError(Exception):
    """One input failed; the message already names it."""


# --- argument parsing -----------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, distributed: bool = True) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, notes or tables")
    p.add_argument("--json", type=Path, metavar="PATH", help="write a machine-readable summary to PATH")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    if not distributed:
        return
    g = p.add_argument_group("multi-host (each process takes every N-th input; process 0 writes --json)")
    g.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() from the environment (TPU pods, SLURM, ...)")  # fmt: skip
    g.add_argument("--coordinator", metavar="HOST:PORT", help="coordinator address of process 0")
    g.add_argument("--num-processes", type=int, metavar="N")
    g.add_argument("--process-id", type=int, metavar="I")


def _io(p: argparse.ArgumentParser, what: str = "INPUT") -> None:
    p.add_argument("inputs", nargs="+", type=Path, metavar=what)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR")


def _model_arg(p: argparse.ArgumentParser, encodes: bool) -> None:
    """Encoders default to the packaged model; decoders to the model the file names."""
    p.add_argument("--model", type=Path, default="default" if encodes else None, metavar="MODEL_DIR",
                   help="a MODEL_DIR from `ddcm convert` or `ddcm train`; default: the packaged model"
                   if encodes else "default: the model the file names, looked up by fingerprint")  # fmt: skip


def _coding(p: argparse.ArgumentParser, *, rules: bool = True, policy: bool = True, restore: bool = False,
            prompts: bool = True) -> None:  # fmt: skip
    from ddcm_jax.bitstream import CODEBOOK_GENERATORS  # NumPy only: --help stays fast

    g = p.add_argument_group("coding")
    if restore:
        g.add_argument("--rule", choices=["turbo", "ddcm"], default="turbo",
                       help="turbo (default: M signed atoms per step, scored against the measurement's residual "
                       "pulled back through the degradation, A^T(y - A(x0_hat))) or ddcm (one atom per step, "
                       "DDCM's MSE rule)")  # fmt: skip
        g.add_argument("--atoms", "-M", type=int, default=None, help="turbo's atoms per step M (default per task)")
    if rules:
        g.add_argument("--quality", "-Q", choices=list(QUALITY), default=None,
                       help=f"operating point: coding size, steps and atoms (default {DEFAULT_QUALITY}; "
                       + "; ".join(f"{k}: {v['size']} px, T {v['steps']}, M {v['atoms']}" for k, v in QUALITY.items())
                       + "); explicit flags below override it")  # fmt: skip
    g.add_argument("--steps", "-T", type=int, default=None,
                   help="diffusion steps T (default: from --quality, or per task for restore, or "
                   f"{DEFAULT_STEPS})")  # fmt: skip
    g.add_argument("--codebook-size", "-K", type=int, default=None,
                   help=f"atoms per codebook K (default {DEFAULT_K}; per task for restore)")  # fmt: skip
    if rules:
        g.add_argument("--atoms", "-M", type=int, default=None,
                       help="atoms per step M (turbo: from --quality; ddcm: 1, more is matching pursuit)")
        g.add_argument("--coef-bits", "-C", type=int, default=1, help="matching-pursuit coefficient bits C")
        g.add_argument("--rule", choices=["ddcm", "turbo"], default="turbo",
                       help="turbo (default: M signed atoms per step, Turbo-DDCM) or ddcm (one atom per step; "
                       "matching pursuit when M > 1)")  # fmt: skip
        g.add_argument("--t-range", type=int, nargs=2, metavar=("T_A", "T_B"),
                       help="select atoms only at original timesteps in [min, max] (others use atom 0)")  # fmt: skip
    if rules:
        g.add_argument("--bpp", type=float, default=None, metavar="B",
                       help="target rate: per image, the operating point whose payload is the largest not above B "
                       "bits per input pixel (turbo: M, and a latent model's no-bits steps; ddcm: K and T)")  # fmt: skip
        g.add_argument("--psnr", type=float, default=None, metavar="P",
                       help="quality target: per image, the lowest-rate point (turbo: M = 1, 2, 4, ...; ddcm: "
                       "K = 2, 4, ..., 2^16) whose decoded image reaches P dB, by a binary search of real encodes "
                       "(about 1 + log2 of the number of points: 5 for turbo at K = 1024); reports what it reached")  # fmt: skip
        g.add_argument("--no-bits-steps", type=int, default=None, metavar="NBS",
                       help="latent models: the last NBS steps before the final one carry no bits (turbo's "
                       "default: Turbo-DDCM's heuristic for the coded size; ddcm: 0)")  # fmt: skip
        g.add_argument("--schedule", choices=["ddcm", "turbo"], default=None,
                       help="latent models: the original DDCM's or Turbo-DDCM's timesteps (default: the rule's)")
    if not restore and prompts:
        g.add_argument("--prompt", default=None, metavar="TEXT",
                       help="latent models: the text that conditions the code (the decoder needs it too)")
        g.add_argument("--guidance", type=float, default=None, metavar="G",
                       help="latent models: classifier-free guidance scale with --prompt (default 0: the prompt's "
                       "own prediction is not used)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="codebook and start-noise seed, 0..2^32-1")
    g.add_argument("--eta", type=float, default=1.0, help="DDIM eta (DDCM uses 1)")
    g.add_argument("--generator", choices=CODEBOOK_GENERATORS, default="philox",
                   help="how codebook atoms are drawn (recorded in the file); shift: the structured, "
                   "FFT-scored family (research)")  # fmt: skip
    if policy:
        s = p.add_argument_group("size policy (the decoded image always has the input's size)")
        m = s.add_mutually_exclusive_group()
        m.add_argument("--fit", dest="policy", action="store_const", const="fit",
                       help="the whole picture, its longer side scaled to --size (default; never enlarged), "
                       "padded to the network's multiple; decoding scales back")  # fmt: skip
        m.add_argument("--crop", dest="policy", action="store_const", const="crop",
                       help="centre square, resized to --size (default: the model's native size), as the original "
                       "code; the output is that square")  # fmt: skip
        m.add_argument("--resize", dest="policy", action="store_const", const="resize",
                       help="the whole image squeezed to a --size square; decoding resizes back")  # fmt: skip
        m.add_argument("--pad", dest="policy", action="store_const", const="pad",
                       help="code at the image's own resolution, padded to the network's multiple (slow on big images)")
        s.add_argument("--size", type=int, metavar="PX",
                       help="coding resolution: fit's longer side (default: from --quality, "
                       f"{QUALITY[DEFAULT_QUALITY]['size']}), crop's / resize's square side")  # fmt: skip
        p.set_defaults(policy="fit")


def _resolve_defaults(args: argparse.Namespace, latent: bool = False) -> None:
    """Fill the coding flags left unset from the quality level (compress, roundtrip), the task (restore)
    or, for a latent model, `LATENT_DEFAULTS`."""
    if latent:
        if getattr(args, "task", None) is not None:
            raise UsageError("restore runs on pixel-space models; latent models compress and generate")
        if getattr(args, "quality", None) is not None:
            raise UsageError("--quality levels are the pixel model's; with a latent model give -T, -K, -M")
        preset = dict(LATENT_DEFAULTS)
        if getattr(args, "rule", "turbo") != "turbo" or args.command == "generate":
            preset["atoms"] = 1
    elif getattr(args, "task", None) is not None:
        preset = dict(RESTORE_DEFAULTS[args.task])
        if args.rule == "ddcm":  # DDCM's single-atom rule: its own (slower, weaker) operating point
            if args.atoms not in (None, 1):
                raise UsageError("restore --rule ddcm codes one atom per step; -M is turbo's")
            preset.update(DDCM_RESTORE)
    elif hasattr(args, "quality"):
        preset = dict(QUALITY[args.quality or DEFAULT_QUALITY])
        preset["codebook_size"] = DEFAULT_K
        if args.rule != "turbo":  # the levels are turbo's; DDCM / matching pursuit keep the classic defaults
            if args.quality is not None:
                raise UsageError("--quality sets turbo's operating points; with --rule ddcm give -T, -K, -M")
            preset = {"steps": DEFAULT_STEPS, "codebook_size": DEFAULT_K, "atoms": 1}
    else:
        preset = {"steps": DEFAULT_STEPS, "codebook_size": DEFAULT_K}
    for name in ("steps", "codebook_size", "atoms"):
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, preset.get(name, 1 if name == "atoms" else None))
    if getattr(args, "policy", None) is not None and getattr(args, "size", None) is None and args.policy == "fit":
        args.size = preset.get("size")
    if getattr(args, "size", None) is not None and args.size < 1:
        raise UsageError("--size must be a positive number of pixels")


def build_parser() -> argparse.ArgumentParser:
    from ddcm_jax import __version__
    from ddcm_jax.convert import add_arguments as add_convert_arguments

    parser = argparse.ArgumentParser(prog="ddcm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ddcm_jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="images -> .ddcm files",
                       description="Compress images (files or folders, recursively) into .ddcm files.")  # fmt: skip
    _io(p)
    _model_arg(p, True)
    _coding(p)
    p.add_argument("--save-reconstruction", action="store_true", help="also write <stem>.png, the decoded image")
    _common(p)

    p = sub.add_parser("decompress", help=".ddcm files -> PNG images",
                       description="Decode .ddcm files (or folders of them) into PNG images.")  # fmt: skip
    _io(p, "FILE")
    _model_arg(p, False)
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="the prompt a latent code was made with (the file holds only its hash)")
    _common(p)

    p = sub.add_parser("roundtrip", help="compress, decode, and report bpp / PSNR / LPIPS",
                       description="Compress images, decode the files, write both, and print a table.")  # fmt: skip
    _io(p)
    _model_arg(p, True)
    _coding(p)
    _common(p)

    p = sub.add_parser("generate", help="compressed generation: images + their bitstreams",
                       description="Generate N images with random atoms; each comes with its .ddcm file.")  # fmt: skip
    p.add_argument("-n", "--num-images", type=int, required=True, metavar="N")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR")
    _model_arg(p, True)
    _coding(p, rules=False, policy=False)
    p.add_argument("--class-label", type=int, help="class for a class-conditional model")
    p.add_argument("--size", type=int, metavar="PX",
                   help="side of the generated squares (default: the window the model learned whole scenes at: "
                   "its training crop for a `ddcm train` model, 64 px for the packaged one; else its native size)")  # fmt: skip
    p.add_argument("--ccfg-subset", type=int, default=None, metavar="N",
                   help="latent models with --prompt: compressed classifier-free guidance, each step the best of N "
                   "atoms drawn from the seed (default N = K); the files decode without the prompt. With "
                   "--guidance instead: random atoms, classic guidance, and the decoder needs the prompt")  # fmt: skip
    _common(p)

    p = sub.add_parser("edit", help="text-based editing with a latent model: code with one prompt, decode with another",
                       description="Compress each image conditioned on --src-prompt (with classifier-free guidance), "
                       "then decode the same code conditioned on --dst-prompt from step --tskip on. A .ddcm input "
                       "made with --src-prompt is re-edited without re-encoding.")  # fmt: skip
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="images, .ddcm files, or folders")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR")
    p.add_argument("--model", type=Path, default=None, metavar="MODEL_DIR",
                   help="a latent (Stable Diffusion) MODEL_DIR (for .ddcm inputs: default, the one the file names)")
    p.add_argument("--src-prompt", dest="prompt", required=True, metavar="TEXT", help="what the image shows")
    p.add_argument("--dst-prompt", required=True, metavar="TEXT", help="what the edited image should show")
    p.add_argument("--tskip", type=int, default=0, metavar="N",
                   help="the first N steps keep the source prompt (default 0: every step follows the destination)")
    p.add_argument("--guidance", type=float, default=6.0, metavar="G",
                   help="classifier-free guidance scale of the code (default 6, the original's; stored in the file)")
    _coding(p, prompts=False)
    _common(p)

    p = sub.add_parser("restore", help="compressed restoration of degraded versions of the inputs",
                       description="Degrade each input by TASK, restore it by compressed posterior "
                       "sampling, and write the restored image and its .ddcm file.")  # fmt: skip
    _io(p)
    p.add_argument("--task", required=True, choices=["colorization", "super-resolution", "inpainting", "blur"])
    p.add_argument("--factor", type=int, default=4, help="super-resolution factor")
    p.add_argument("--blur-sigma", type=float, default=3.0, help="Gaussian blur std (pixels)")
    p.add_argument("--blur-kernel", type=int, default=61, help="Gaussian blur kernel size (odd)")
    p.add_argument("--mask", type=Path, help="inpainting mask image, white = observed (default: centre hole)")
    _model_arg(p, True)
    _coding(p, rules=False, restore=True)
    _common(p)

    p = sub.add_parser("info", help="describe .ddcm files", description="Print what a .ddcm file holds.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="FILE")
    _common(p, distributed=False)

    from ddcm_jax.train import add_arguments as add_train_arguments

    p = sub.add_parser("train", help="train an ADM diffusion model on the bundled photographs",
                       description="DDPM training of an ADM network; writes a MODEL_DIR (needs the train extra).")  # fmt: skip
    add_train_arguments(p)

    p = sub.add_parser("convert", help="convert a PyTorch checkpoint into a MODEL_DIR",
                       description="Convert a guided-diffusion checkpoint, or a diffusers Stable Diffusion folder "
                       "(--format diffusers), into a MODEL_DIR (no torch needed).")  # fmt: skip
    add_convert_arguments(p)
    return parser


# --- inputs and outputs ---------------------------------------------------------------------------


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
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(summary, default=_jsonable).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).ravel()
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: data.size] = data
    parts = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    merged = [json.loads(bytes(parts[i, : sizes[i]]).decode()) for i in range(len(sizes))]
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


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    raise TypeError(type(v).__name__)


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(v, 4)


class Coding(NamedTuple):
    """What the coding flags say: the code's spec, the seed and the size policy."""

    spec: Any  # ddcm_jax.spec.CodeSpec
    seed: int
    policy: str
    latent: bool = False
    num_timesteps: int | None = None  # the model's, when model.json says

    def for_image(self, args: argparse.Namespace, height: int, width: int) -> Any:
        """The spec of one image: `spec`, or with --bpp the operating point for the pixels of its output
        (H0 x W0; crop: the centre square)."""
        if getattr(args, "bpp", None) is None:
            return self.spec
        from ddcm_jax import rate
        from ddcm_jax.selection import Turbo

        spec = self.spec
        if self.latent:  # the rate point sets no-bits steps, which belong to a named schedule
            spec = spec.replace(schedule=args.schedule or ("turbo" if isinstance(spec.rule, Turbo) else "ddcm"))
        pixels = min(height, width) ** 2 if self.policy == "crop" else height * width  # what the user gets back
        try:
            return rate.for_bpp(spec, args.bpp, pixels, latent=self.latent, max_steps=self.num_timesteps)
        except rate.RateError as e:
            raise InputError(f"--bpp {args.bpp:g}: {e}") from None


# The flag that sets each CodeSpec field, for its usage errors.
_SPEC_FLAGS = {"steps": "--steps", "codebook_size": "--codebook-size", "num_atoms": "--atoms",
               "coef_bits": "--coef-bits", "eta": "--eta", "t_range": "--t-range", "generator": "--generator",
               "rule": "--rule", "schedule": "--schedule", "no_bits_steps": "--no-bits-steps"}  # fmt: skip


def _latent_flags(args: argparse.Namespace, latent: bool) -> None:
    """Latent-only flags on a pixel model, and pixel-only ones on a latent model: usage errors."""
    given = [f for f, name in (("--no-bits-steps", "no_bits_steps"), ("--schedule", "schedule"),
                               ("--prompt", "prompt"), ("--guidance", "guidance"), ("--ccfg-subset", "ccfg_subset"))
             if getattr(args, name, None) is not None]  # fmt: skip
    if not latent and given:
        raise UsageError(f"{', '.join(given)}: options of latent (Stable Diffusion) models")
    if latent:
        if args.eta != 1.0:
            raise UsageError("--eta: latent codes use eta 1 (their no-bits steps 0)")
        if getattr(args, "class_label", None) is not None:
            raise UsageError("--class-label: latent models are conditioned by --prompt")
        g = getattr(args, "guidance", None)
        if g is not None and not getattr(args, "prompt", None):
            raise UsageError("--guidance needs --prompt")
        if args.command == "generate":
            n = getattr(args, "ccfg_subset", None)
            if n is not None and (g is not None or not args.prompt):
                raise UsageError("--ccfg-subset: compressed guidance comes with --prompt and without --guidance")
            if n is not None and n < 1:
                raise UsageError("--ccfg-subset must be at least 1")
        elif getattr(args, "prompt", None) and not g:
            raise UsageError("--prompt conditions the code through classifier-free guidance: give --guidance G > 0")
        if g is not None and not (math.isfinite(g) and 0 <= g <= 100):
            raise UsageError("--guidance must be in 0..100")


def _settings(args: argparse.Namespace) -> Coding:
    """The coding flags as a `CodeSpec` (validated there, once) plus seed and policy; usage errors at once."""
    from ddcm_jax.spec import CodeSpec, SpecError

    family = _model_family(getattr(args, "model", None))
    latent = family == "sd"
    if getattr(args, "psnr", None) is not None:
        rule = getattr(args, "rule", "turbo")
        if args.bpp is not None:
            raise UsageError("--psnr and --bpp: give one target")
        if not (math.isfinite(args.psnr) and args.psnr > 0):
            raise UsageError("--psnr must be a positive number of dB")
        if rule == "turbo" and args.atoms is not None:
            raise UsageError("--psnr searches turbo's -M; give one or the other")
        if rule == "ddcm" and (args.codebook_size is not None or args.atoms not in (None, 1)):
            raise UsageError("--psnr searches ddcm's -K; give one or the other (matching pursuit: no --psnr)")
    if getattr(args, "bpp", None) is not None:
        rule = getattr(args, "rule", "turbo")
        if not (math.isfinite(args.bpp) and args.bpp > 0):
            raise UsageError("--bpp must be a positive number of bits per pixel")
        if rule == "turbo" and (args.atoms is not None or args.no_bits_steps is not None):
            raise UsageError("--bpp picks turbo's -M (and no-bits steps); give one or the other")
        if rule == "ddcm" and (args.codebook_size is not None or args.atoms not in (None, 1)):
            raise UsageError("--bpp picks ddcm's -K and -T; give one or the other (matching pursuit: no --bpp)")
    if getattr(args, "bpp", None) is not None and getattr(args, "rule", "turbo") == "turbo":
        args.atoms = 1  # a placeholder: the target picks M
    _resolve_defaults(args, latent)
    if getattr(args, "psnr", None) is not None and getattr(args, "rule", "turbo") == "turbo":
        # The level's M starts the search (rate.search); the ladder's points are powers of two up to K / 2.
        from ddcm_jax.rate import MAX_TURBO_ATOMS

        top = min(max(1, args.codebook_size // 2), MAX_TURBO_ATOMS)
        args.atoms = min(1 << (max(1, args.atoms).bit_length() - 1), top)
    t_range = getattr(args, "t_range", None)
    _latent_flags(args, latent)
    try:
        spec = CodeSpec.create(
            steps=args.steps, codebook_size=args.codebook_size, rule=getattr(args, "rule", "ddcm"),
            num_atoms=getattr(args, "atoms", 1), coef_bits=getattr(args, "coef_bits", 1), generator=args.generator,
            eta=args.eta, t_range=None if t_range is None else (min(t_range), max(t_range)),
            clip=not latent,
        )  # fmt: skip
        if latent and getattr(args, "no_bits_steps", None) is not None:
            n = args.no_bits_steps
            if not 0 <= n <= args.steps - 2:
                raise SpecError("no_bits_steps", f"no-bits steps must be in 0..steps-2 = {args.steps - 2}, got {n}")
            if getattr(args, "rule", "turbo") == "turbo" and t_range is not None:
                raise SpecError("t_range", "turbo codes its first steps; give --no-bits-steps instead")
    except SpecError as e:
        raise UsageError(f"{_SPEC_FLAGS.get(e.field, e.field)}: {e}") from None
    if latent:
        from ddcm_jax.respacing import TURBO_TIMESTEPS

        schedule = getattr(args, "schedule", None) or ("turbo" if getattr(args, "rule", "turbo") == "turbo" else "ddcm")
        if schedule == "turbo" and not 2 <= args.steps <= len(TURBO_TIMESTEPS):
            raise UsageError(f"--steps: the turbo schedule has 2..{len(TURBO_TIMESTEPS)} steps, not {args.steps}")
        subset = getattr(args, "ccfg_subset", None)
        if subset is not None and subset > args.codebook_size:
            raise UsageError(f"--ccfg-subset {subset}: more atoms than the codebook's K = {args.codebook_size}")
    if not 0 <= args.seed < 2**32:
        raise UsageError("--seed must be in 0..2^32-1")
    num_timesteps = _model_timesteps(getattr(args, "model", None), latent)
    if num_timesteps is not None and args.steps > num_timesteps:
        raise UsageError(f"--steps must be at most the model's {num_timesteps} diffusion timesteps")
    if t_range is not None and num_timesteps is not None and not all(0 <= t < num_timesteps for t in t_range):
        raise UsageError(f"--t-range must lie in 0..{num_timesteps - 1}, the model's timesteps")
    if getattr(args, "task", None) is not None:
        from ddcm_jax.bitstream import LIMITS

        if not 1 <= args.factor <= LIMITS["factor"]:
            raise UsageError(f"--factor must be in 1..{LIMITS['factor']}")
        if not (1 <= args.blur_kernel <= LIMITS["kernel"] and args.blur_kernel % 2 == 1):
            raise UsageError(f"--blur-kernel must be odd, in 1..{LIMITS['kernel']}")
        if not (math.isfinite(args.blur_sigma) and args.blur_sigma > 0):
            raise UsageError("--blur-sigma must be a positive number")
    return Coding(spec, args.seed, getattr(args, "policy", "fit"), latent, num_timesteps)


def _model_timesteps(model: Path | str | None, latent: bool = False) -> int | None:
    """The model's number of diffusion timesteps, read from its model.json alone (no weights).

    Lets settings that depend on it be refused as usage errors before anything is loaded;
    None when the file cannot be read (loading the model reports that, in its own words).
    """
    try:
        meta = _read_model_json(model)
        steps = meta["scheduler"]["num_train_timesteps"] if latent else meta["diffusion"]["num_timesteps"]
    except (KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None


def _read_model_json(model: Path | str | None) -> Any:
    """A MODEL_DIR's parsed model.json (<= 1 MiB), or None when there is none or it cannot be read."""
    from ddcm_jax.model import resolve_model_dir

    if model is None:
        return None
    try:
        path = resolve_model_dir(model) / "model.json"
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # the loader says what is wrong, naming the file
        return None


def _model_family(model: Path | str | None) -> str | None:
    """'sd' for a latent MODEL_DIR, from its model.json alone; None otherwise or when unreadable."""
    try:
        family = _read_model_json(model).get("family")
    except (AttributeError, TypeError):
        return None
    return family if isinstance(family, str) else None


def _load_model(path: Path) -> Any:
    from ddcm_jax.families import load_model

    return load_model(path)  # "default" resolves to the packaged model


def _record(enc: Any, source: Path | None, outputs: list[Path], seconds: float, **extra: Any) -> dict[str, Any]:
    g = enc.header.geometry
    # bpp over the pixels the user gets back: the input's (crop: its centre square).
    out_pixels = min(g.original_size) ** 2 if g.size_policy == "crop" else g.original_size[0] * g.original_size[1]
    coded_pixels = g.size[0] * g.size[1]
    return {
        "file": None if source is None else str(source),
        "outputs": [str(p) for p in outputs],
        "bytes": len(enc.data),
        "payload_bits": enc.payload_bits,
        "bpp": enc.payload_bits / out_pixels,
        "bpp_file": 8 * len(enc.data) / out_pixels,
        "bpp_coded": enc.payload_bits / coded_pixels,
        "coded_size": list(g.size),
        "seconds": round(seconds, 3),
        **extra,
    }


# --- commands -----------------------------------------------------------------------------------


def _groups(items: list[Any], key: Callable[[Any], Any], size: int) -> Iterator[list[Any]]:
    """Consecutive runs of up to `size` items sharing key(item), in input order."""
    buckets: dict[Any, list[Any]] = {}
    for item in items:
        b = buckets.setdefault(key(item), [])
        b.append(item)
        if len(b) == size:
            yield buckets.pop(key(item))
    yield from buckets.values()


@dataclasses.dataclass
class _Loaded:
    job: Job
    pixels: Any
    notes: list[str]
    coded: tuple[int, int]
    t0: float
    spec: Any = None


def _encode_jobs(args: argparse.Namespace, run: Run, jobs: list[Job], encode: Callable[..., Any],
                 decode_back: bool, coding: Coding) -> None:  # fmt: skip
    """Shared loop of compress / roundtrip / restore: one image per local device at a time."""
    import jax

    from ddcm_jax import bitstream, codec, images, memory, metrics

    model = _load_model(args.model)
    writes_png = decode_back or getattr(args, "save_reconstruction", False)
    budget = memory.budget_bytes()
    loaded: list[_Loaded] = []
    for job in jobs:
        t0 = time.perf_counter()
        try:
            run.claim(job.stem.with_suffix(".ddcm"), job.source)
            if writes_png:
                run.claim(job.stem.with_suffix(".png"), job.source)
            if args.command == "restore":
                run.claim(_degraded_path(job.stem), job.source)
            pixels, notes = images.load_image(job.source, budget=budget)
            for note in notes:
                run.say(f"note: {job.source}: {note}")
            h0, w0 = pixels.shape[:2]
            # The decoded image comes back at the input's geometry: resampled and, maybe, written.
            memory.check_host("resample", h0, w0, what=str(job.source), budget=budget)
            if writes_png:
                memory.check_host("png", h0, w0, what=str(job.source), budget=budget)
            side = codec.coding_side(model, args.policy, args.size)
            coded = images.coded_size(pixels.shape[:2], args.policy, side, codec.size_multiple(model))
            loaded.append(_Loaded(job, pixels, notes, coded, t0, coding.for_image(args, h0, w0)))
        except Exception as e:
            run.fail(job.source, e)
            run.done()
    for group in _groups(loaded, lambda item: (item.coded, item.spec), jax.local_device_count()):
        try:
            if getattr(args, "psnr", None) is not None:
                encs = [_psnr_search(args, run, model, item, encode, budget) for item in group]
            else:
                with run.steps("restore" if args.command == "restore" else "encode") as progress:
                    encs = encode(model, [item.pixels for item in group], group[0].spec, budget, progress)
            results = [enc.decoded for enc in encs]
            if decode_back:
                streams = [bitstream.decode(enc.data, str(item.job.source)) for enc, item in zip(encs, group, strict=True)]
                with run.steps("decode") as progress:
                    results = codec.decode_streams(model, streams, progress=progress,
                                                   prompt=getattr(args, "prompt", None))  # fmt: skip
        except Exception as e:
            for item in group:
                run.fail(item.job.source, e)
                run.done()
            continue
        for item, enc, result in zip(group, encs, results, strict=True):
            try:
                if decode_back and not (result.shape == enc.decoded.shape and (result == enc.decoded).all()):
                    raise InputError(f"{item.job.source}: the decoder's image differs from the encoder's "
                                     "reconstruction (nondeterministic backend?)")  # fmt: skip
                out_ddcm = item.job.stem.with_suffix(".ddcm")
                files = {out_ddcm: enc.data}
                if writes_png:
                    files[item.job.stem.with_suffix(".png")] = images.png_bytes(result)
                if enc.degraded is not None:
                    files[_degraded_path(item.job.stem)] = images.png_bytes(enc.degraded)
                images.commit_files(files)
                quality: dict[str, Any] = {}
                if enc.reference is not None and enc.reference.shape == result.shape:
                    skip = metrics.lpips_skip_reason(*result.shape[:2], budget=budget)
                    quality = {"psnr": _finite(metrics.psnr(enc.reference, result)),
                               "lpips": None if skip else _finite(metrics.lpips(enc.reference, result))}  # fmt: skip
                    if skip:
                        quality["lpips_skipped"] = skip
                if enc.consistency_db is not None:
                    quality["consistency_psnr"] = _finite(enc.consistency_db)
                rec = _record(enc, item.job.source, list(files), time.perf_counter() - item.t0, **quality,
                              notes=list(item.notes))  # fmt: skip
                run.records.append(rec)
                if args.command == "restore":
                    run.say(_restore_line(item.job.source, out_ddcm, rec))
                elif not decode_back:
                    run.say(f"{item.job.source} -> {out_ddcm} ({rec['bytes']} bytes, {rec['bpp']:.4f} bpp)")
            except Exception as e:
                run.fail(item.job.source, e)
            run.done()


def _psnr_search(args: argparse.Namespace, run: Run, model: Any, item: _Loaded, encode: Callable[..., Any],
                 budget: int) -> Any:  # fmt: skip
    """--psnr P: the lowest point of `rate.ladder` whose decoded image reaches P dB against the input
    (`rate.search`, from the point the settings name), or the highest one if none does."""
    from ddcm_jax import metrics, rate

    points = rate.ladder(item.spec)
    tried: dict[int, tuple[Any, float]] = {}

    def trial(i: int) -> tuple[Any, float]:
        if i not in tried:
            with run.steps(f"encode {i + 1}/{len(points)}") as progress:
                enc = encode(model, [item.pixels], points[i], budget, progress)[0]
            tried[i] = (enc, metrics.psnr(enc.reference, enc.decoded))
        return tried[i]

    start = points.index(item.spec) if item.spec in points else None
    hi = rate.search(len(points), lambda i: trial(i)[1] >= args.psnr, start)
    enc, reached = trial(hi)
    rule = points[hi].rule
    what = f"M {rule.num_atoms}" if rule.code_name == "turbo" else f"K {points[hi].codebook_size}"
    verdict = "reached" if reached >= args.psnr else "did not reach; the highest point gives"
    note = (f"--psnr {args.psnr:g}: {verdict} {reached:.2f} dB at {what} ({len(enc.data)} bytes) after "
            f"{len(tried)} encodes")  # fmt: skip
    run.say(f"note: {item.job.source}: {note}")
    item.notes.append(note)  # and into the JSON summary's notes
    return enc


def _degraded_path(stem: Path) -> Path:
    return stem.with_name(stem.name + "_degraded.png")


def _restore_line(source: Path, out: Path, rec: dict[str, Any]) -> str:
    """What `restore` prints per image: the files, the rate, agreement with the measurement and the original."""
    c, p, lp = rec.get("consistency_psnr"), rec.get("psnr"), rec.get("lpips")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    return (f"{source} -> {out.with_suffix('.png')} ({rec['bytes']} bytes, {rec['bpp']:.4f} bpp); "
            f"consistency with the measurement {fmt(c, '.2f')} dB; against the original: PSNR {fmt(p, '.2f')} dB, "
            f"LPIPS {fmt(lp, '.3f')}; degraded input: {_degraded_path(out.with_suffix(''))}")  # fmt: skip


def _table(run: Run) -> None:
    rows = [r for r in run.records if "psnr" in r]
    if not rows or run.args.quiet:
        return
    cols = ["file", "bytes", "bpp", "bpp(file)", "PSNR dB", "LPIPS", "s"]
    data = [[Path(r["file"]).name, str(r["bytes"]), f"{r['bpp']:.4f}", f"{r['bpp_file']:.4f}",
             "-" if r["psnr"] is None else f"{r['psnr']:.2f}",
             "-" if r.get("lpips") is None else f"{r['lpips']:.4f}", f"{r['seconds']:.1f}"] for r in rows]  # fmt: skip
    widths = [max(len(c), *(len(d[i]) for d in data)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for d in data:
        print("  ".join(v.ljust(w) for v, w in zip(d, widths, strict=True)))
    for reason in dict.fromkeys(r["lpips_skipped"] for r in rows if r.get("lpips_skipped")):
        print(f"(LPIPS '-': {reason})")


def cmd_encode(args: argparse.Namespace) -> int:
    from ddcm_jax import codec
    from ddcm_jax.images import IMAGE_SUFFIXES

    coding = _settings(args)
    _init_distributed(args)
    jobs, errors = _expand(args.inputs, args.output, IMAGE_SUFFIXES)
    every_input = [job.source for job in jobs] + ([args.mask] if getattr(args, "mask", None) else [])
    jobs = _my_share(jobs)
    errors = errors if _process_index() == 0 else []
    run = Run(args.command, args, len(jobs))
    run.protect(every_input)
    for e in errors:
        run.error(e)
    if args.command == "restore":
        mask = _load_mask(args.mask) if args.mask is not None else None

        def encode(model: Any, pixel_list: list[Any], spec: Any, budget: int, progress: Any) -> Any:
            return codec.encode_images(model, pixel_list, spec, seed=coding.seed, size_policy=coding.policy,
                                       coding_size=args.size, budget=budget, task=args.task, factor=args.factor,
                                       blur_sigma=args.blur_sigma, blur_kernel=args.blur_kernel, mask=mask,
                                       progress=progress)  # fmt: skip
    else:

        def encode(model: Any, pixel_list: list[Any], spec: Any, budget: int, progress: Any) -> Any:
            return codec.encode_images(model, pixel_list, spec, seed=coding.seed, size_policy=coding.policy,
                                       coding_size=args.size, budget=budget, progress=progress,
                                       **_latent_kwargs(args, spec))  # fmt: skip

    if jobs:
        _encode_jobs(args, run, jobs, encode, decode_back=args.command in ("roundtrip", "restore"), coding=coding)
    code = run.finish()
    if args.command == "roundtrip":
        _table(run)
    return code


def _latent_kwargs(args: argparse.Namespace, spec: Any = None) -> dict[str, Any]:
    """The latent-only codec keywords the flags set (none for a pixel model: `_latent_flags` saw to it);
    a spec that already names its schedule (--bpp chose its no-bits steps) takes none of those."""
    out: dict[str, Any] = {}
    for name in ("no_bits_steps", "schedule"):
        if getattr(args, name, None) is not None and getattr(spec, "schedule", None) is None:
            out[name] = getattr(args, name)
    if getattr(args, "prompt", None):
        out.update(prompt=args.prompt, guidance=args.guidance or 0.0)
    return out


def _ccfg(args: argparse.Namespace, spec: Any) -> dict[str, Any]:
    """generate --prompt without --guidance: compressed CFG, over --ccfg-subset atoms (default K)."""
    if not getattr(args, "prompt", None) or args.guidance is not None:
        return {}
    return {"ccfg_subset": args.ccfg_subset or spec.codebook_size}


def _load_mask(path: Path) -> Any:
    import numpy as np

    from ddcm_jax.images import load_image

    try:
        pixels, _ = load_image(path)
    except ValueError as e:
        raise UsageError(f"--mask {e}") from None
    return (pixels.mean(axis=-1, keepdims=True) >= 128).astype(np.float32)


def cmd_generate(args: argparse.Namespace) -> int:
    import jax

    from ddcm_jax import codec, images, memory

    if args.num_images < 1:
        raise UsageError("-n must be at least 1")
    base = _settings(args)
    if base.seed + args.num_images > 2**32:
        raise UsageError("--seed + N must stay below 2^32 (image i uses seed + i)")
    _init_distributed(args)
    width = max(4, len(str(args.num_images - 1)))
    seeds = _my_share(list(range(base.seed, base.seed + args.num_images)))
    model = _load_model(args.model)
    try:
        codec.generation_side(model, args.size)
    except ValueError as e:
        raise UsageError(f"--size {e}") from None
    run = Run("generate", args, len(seeds))
    budget = memory.budget_bytes()
    for group in _groups(seeds, lambda _: 0, jax.local_device_count()):
        t0 = time.perf_counter()
        try:
            with run.steps("generate") as progress:
                encs = codec.generate_images(model, base.spec, group, class_label=args.class_label, budget=budget,
                                             progress=progress, size=args.size, **_latent_kwargs(args),
                                             **_ccfg(args, base.spec))  # fmt: skip
        except Exception as e:
            for sd in group:
                run.fail(args.output / f"gen_{sd - base.seed:0{width}d}", e)
                run.done()
            continue
        for sd, enc in zip(group, encs, strict=True):
            stem = args.output / f"gen_{sd - base.seed:0{width}d}"
            try:
                files = {stem.with_suffix(".ddcm"): enc.data, stem.with_suffix(".png"): images.png_bytes(enc.decoded)}
                images.commit_files(files)
                rec = _record(enc, None, list(files), (time.perf_counter() - t0) / len(group), seed=sd)
                run.records.append(rec)
                run.say(f"seed {sd} -> {stem.with_suffix('.png')}, {stem.with_suffix('.ddcm')} ({rec['bytes']} bytes)")
            except Exception as e:
                run.fail(stem, e)
            run.done()
    return run.finish()


def cmd_decompress(args: argparse.Namespace) -> int:
    import jax

    from ddcm_jax import bitstream, codec, images, memory
    from ddcm_jax.families import find_model

    budget = memory.budget_bytes()
    _init_distributed(args)
    jobs, errors = _expand(args.inputs, args.output, {".ddcm"})
    every_input = [job.source for job in jobs]
    jobs = _my_share(jobs)
    errors = errors if _process_index() == 0 else []
    run = Run("decompress", args, len(jobs))
    run.protect(every_input)
    for e in errors:
        run.error(e)
    models: dict[Path, Any] = {}
    if args.model is not None:
        models[args.model] = _load_model(args.model)
    ready: list[tuple[Job, Any, Path, float]] = []
    for job in jobs:
        t0 = time.perf_counter()
        name = printable(job.source)
        try:
            run.claim(job.stem.with_suffix(".png"), job.source)
            data = _read_limited(job.source)
            # The header first, checked against the model; only then the payload's code.
            head = bitstream.decode_header(data, name).header
            where = args.model
            if where is None:
                where = find_model(head.model.fingerprint_hex, models)
                if where is None:
                    raise InputError(f"{name}: needs model {head.model.fingerprint_hex}…, which is not "
                                     "among the known models (DDCM_MODELS); pass --model MODEL_DIR")  # fmt: skip
            if where not in models:
                models[where] = _load_model(where)
            codec.check_model(head, models[where], name, budget=budget)
            codec.check_prompt(head, args.prompt, name)
            # The output is resampled to, and written at, the size the header claims.
            for stage in ("resample", "png"):
                memory.check_host(stage, *head.geometry.original_size, what=f"{name}: decoding", budget=budget)
            stream = bitstream.decode(data, name)
            del data
            ready.append((job, stream, where, t0))
        except Exception as e:
            run.fail(name, e)
            run.done()
    signature = lambda item: (item[2], codec.decode_signature(item[1].header))  # noqa: E731
    for group in _groups(ready, signature, jax.local_device_count()):
        try:
            with run.steps("decode") as progress:
                outputs = codec.decode_streams(models[group[0][2]], [item[1] for item in group], progress=progress,
                                               prompt=args.prompt)  # fmt: skip
        except Exception as e:
            for item in group:
                run.fail(item[0].source, e)
                run.done()
            continue
        for (job, stream, _, t0), pixels in zip(group, outputs, strict=True):
            try:
                out = job.stem.with_suffix(".png")
                images.commit_files({out: images.png_bytes(pixels)})
                h = stream.header
                run.records.append({"file": str(job.source), "outputs": [str(out)], "bytes": stream.total_bytes,
                                    "bpp": stream.payload_bits / (h.geometry.size[0] * h.geometry.size[1]),
                                    "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
                run.say(f"{job.source} -> {out}")
            except Exception as e:
                run.fail(job.source, e)
            run.done()
    return run.finish()


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


def describe(stream: Any, nbytes: int) -> dict[str, Any]:
    """What `ddcm info` reports about a checked file (`bitstream.decode_header`: no payload decoding)."""
    from ddcm_jax import bitstream

    h = stream.header
    s, g, m, t, p = h.spec, h.geometry, h.model, h.task, h.provenance
    coded = g.size[0] * g.size[1]
    n_coded = int(bitstream.code_mask(h).sum())
    steps = s.respacing_or_steps if s.latent_schedule is None else f"latent-{s.latent_schedule}"
    out = {
        "format_version": h.version,
        "bytes": nbytes, "header_bytes": stream.header_bytes, "payload_bytes": stream.payload_bytes, "crc_bytes": 4,
        "payload_bits": stream.payload_bits, "coded_steps": n_coded,
        "bpp": stream.payload_bits / coded, "bpp_file": 8 * nbytes / coded,
        "rule": s.rule, "task": t.name, "steps": s.steps, "codebook_size": s.codebook_size,
        "num_atoms": s.num_atoms, "coef_bits": s.coef_bits,
        "t_range": None if s.t_range is None else list(s.t_range), "eta": s.eta, "seed": p.seed,
        "schedule": f"{m.noise_schedule}/{m.num_timesteps}/{steps}", "clip": s.clip,
        "class_label": t.class_label, "model": m.fingerprint_hex, "compute_dtype": m.compute_dtype,
        "coded_size": list(g.size), "original_size": list(g.original_size), "size_policy": g.size_policy,
        "jax_version": p.jax_version, "prng": p.prng_impl, "generator": s.generator,
        "threefry_partitionable": p.threefry_partitionable,
    }  # fmt: skip
    if s.latent_schedule is not None:
        out.update(no_bits_steps=s.no_bits_steps, prompt_hash=None if t.prompt_hash is None else t.prompt_hash.hex(),
                   guidance=t.guidance)  # fmt: skip
    if t.name == "super-resolution":
        out["factor"] = t.factor
    if t.name == "blur":
        out.update(blur_kernel=t.blur_kernel, blur_sigma=t.blur_sigma)
    return out


def cmd_info(args: argparse.Namespace) -> int:
    from ddcm_jax import bitstream

    run = Run("info", argparse.Namespace(**{**vars(args), "quiet": True}), 0)
    for path in args.inputs:
        name = printable(path)
        try:
            data = _read_limited(path)
            # Everything info prints is in the header: the payload's code is not decoded.
            d = describe(bitstream.decode_header(data, name), len(data))
        except Exception as e:
            run.fail(name, e)
            continue
        run.records.append({"file": str(path), **d})
        if not args.quiet:
            t = "all steps" if d["t_range"] is None else f"t in [{d['t_range'][0]}, {d['t_range'][1]}]"
            extra = f", M {d['num_atoms']}" + (f", C {d['coef_bits']}" if d["rule"] == "mp" else "")
            print(f"{name}: .ddcm v{d['format_version']}, {d['bytes']} bytes = {d['header_bytes']} header + "
                  f"{d['payload_bytes']} payload + 4 CRC-32\n"
                  f"  {d['task']}, rule {d['rule']}, T {d['steps']} ({printable(d['schedule'])}), K {d['codebook_size']}{extra}, "
                  f"{t}, eta {d['eta']:g}, seed {d['seed']}"
                  + (f", class {d['class_label']}" if d["class_label"] is not None else "")
                  + (f", {d['no_bits_steps']} no-bits steps" if "no_bits_steps" in d else "")
                  + (f", prompt sha256:{d['prompt_hash']}…, guidance {d['guidance']:g}" if d.get("prompt_hash")
                     else "") + "\n"
                  f"  payload {d['payload_bits']} bits over {d['coded_steps']} coded steps: "
                  f"{d['bpp']:.5f} bpp (payload), {d['bpp_file']:.5f} bpp (whole file), "
                  f"over the {d['coded_size'][1]}x{d['coded_size'][0]} (width x height) coded image\n"
                  f"  image: {d['original_size'][1]}x{d['original_size'][0]} input, policy {d['size_policy']}\n"
                  f"  model {d['model']}… ({d['compute_dtype']}); jax {printable(d['jax_version'])}, {d['prng']} keys, "
                  f"{d['generator']} codebooks, "
                  f"threefry_partitionable={d['threefry_partitionable']}")  # fmt: skip
    return run.finish()


def cmd_edit(args: argparse.Namespace) -> int:
    """Text-based editing: images are coded with the source prompt first; .ddcm files are decoded."""
    from ddcm_jax import bitstream, codec, images, memory
    from ddcm_jax.families import find_model
    from ddcm_jax.images import IMAGE_SUFFIXES

    if not 0 <= args.tskip <= 10**5:
        raise UsageError("--tskip must be a step number >= 0")
    jobs, errors = _expand(args.inputs, args.output, set(IMAGE_SUFFIXES) | {".ddcm"})
    images_in = [j for j in jobs if j.source.suffix.lower() != ".ddcm"]
    if images_in and args.model is None:
        raise UsageError("--model: images are coded first, with a latent MODEL_DIR")
    coding = _settings(args) if images_in else None
    if coding is not None and not coding.latent:
        raise UsageError("--model: text-based editing needs a latent (Stable Diffusion) model")
    if coding is not None and args.tskip > coding.spec.steps:
        raise UsageError(f"--tskip {args.tskip}: past the code's {coding.spec.steps} steps (-T)")
    for job in jobs:  # a code's steps are in its header: read before any model loads
        if job.source.suffix.lower() == ".ddcm":
            try:
                steps = bitstream.decode_header(_read_limited(job.source), printable(job.source)).header.spec.steps
            except Exception:
                continue  # unreadable: reported in its turn below
            if args.tskip > steps:
                raise UsageError(f"--tskip {args.tskip}: past the {steps} steps of {printable(job.source)}")
    run = Run("edit", args, len(jobs))
    run.protect(job.source for job in jobs)
    for e in errors:
        run.error(e)
    budget = memory.budget_bytes()
    models: dict[Path, Any] = {}

    def model_for(where: Path) -> Any:
        if where not in models:
            models[where] = _load_model(where)
        return models[where]

    for job in jobs:
        t0 = time.perf_counter()
        name = printable(job.source)
        try:
            edited_png = job.stem.with_name(job.stem.name + "_edit.png")
            run.claim(edited_png, job.source)
            files: dict[Path, bytes] = {}
            if job.source.suffix.lower() == ".ddcm":
                data = _read_limited(job.source)
                head = bitstream.decode_header(data, name).header
                where = args.model or find_model(head.model.fingerprint_hex, models)
                if where is None:
                    raise InputError(f"{name}: needs model {head.model.fingerprint_hex}…, which is not among the known "
                                     "models (DDCM_MODELS); pass --model MODEL_DIR")  # fmt: skip
                model = model_for(where)
                codec.check_model(head, model, name, budget=budget)
                codec.check_prompt(head, args.prompt, name)
                stream = bitstream.decode(data, name)
                enc = None
            else:
                model = model_for(args.model)
                run.claim(job.stem.with_suffix(".ddcm"), job.source)
                run.claim(job.stem.with_suffix(".png"), job.source)
                pixels, notes = images.load_image(job.source, budget=budget)
                for note in notes:
                    run.say(f"note: {job.source}: {note}")
                spec = coding.for_image(args, *pixels.shape[:2])
                with run.steps("encode") as progress:
                    enc = codec.encode_images(model, [pixels], spec, seed=coding.seed, size_policy=coding.policy,
                                              coding_size=args.size, budget=budget, progress=progress,
                                              **_latent_kwargs(args, spec))[0]  # the source prompt, guidance  # fmt: skip
                files[job.stem.with_suffix(".ddcm")] = enc.data
                files[job.stem.with_suffix(".png")] = images.png_bytes(enc.decoded)
                stream = bitstream.decode(enc.data, name)
            if args.tskip > stream.header.spec.steps:
                raise InputError(f"{name}: --tskip {args.tskip} is past the code's {stream.header.spec.steps} steps")
            with run.steps("edit") as progress:
                edited = codec.decode_streams(model, [stream], progress=progress, prompt=args.prompt,
                                              edit_prompt=args.dst_prompt, tskip=args.tskip)[0]  # fmt: skip
            files[edited_png] = images.png_bytes(edited)
            images.commit_files(files)
            run.records.append({"file": str(job.source), "outputs": [str(f) for f in files],
                                "bytes": stream.total_bytes, "tskip": args.tskip,
                                "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
            made = "" if enc is None else f"{job.stem.with_suffix('.ddcm')} ({stream.total_bytes} bytes), "
            run.say(f"{job.source} -> {made}{edited_png}")
        except Exception as e:
            run.fail(name, e)
        run.done()
    return run.finish()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "edit": cmd_edit,
    "compress": cmd_encode,
    "roundtrip": cmd_encode,
    "restore": cmd_encode,
    "generate": cmd_generate,
    "decompress": cmd_decompress,
    "info": cmd_info,
}


def _check_paths(args: argparse.Namespace) -> None:
    """Output folder and --json target problems are usage errors, found before any work."""
    out = getattr(args, "output", None)
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"-o {printable(out)}: exists and is not a folder")
    report = getattr(args, "json", None)
    if report is not None:
        from ddcm_jax.images import report_target_problem

        problem = report_target_problem(report)
        if problem:
            raise UsageError(f"--json {printable(report)}: {problem}")


def _check_text(args: argparse.Namespace) -> None:
    """Prompts are UTF-8 text: bytes the terminal's encoding could not read arrive as surrogates."""
    source = "--src-prompt" if args.command == "edit" else "--prompt"
    for flag, name in ((source, "prompt"), ("--dst-prompt", "dst_prompt")):
        text = getattr(args, name, None)
        if text is not None:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"{flag}: not valid UTF-8 text") from None


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
        parser.error(printable(str(e)))  # exits with 2
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


if __name__ == "__main__":
    sys.exit(main())
