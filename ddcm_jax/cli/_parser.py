"""The command line's arguments: the parser (`build_parser`), the coding flags as a spec (`_settings`, through
`ddcm_jax.presets`), the codec keywords they set, and the checks made before any work."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ddcm_jax.cli._runs import InputError, UsageError
from ddcm_jax.presets import DEFAULT_K, DEFAULT_QUALITY, DEFAULT_STEPS, QUALITY
from ddcm_jax.printable import printable


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
    _output(p)


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that already exist (default: refuse them, per input)")  # fmt: skip


def _model_arg(p: argparse.ArgumentParser, encodes: bool) -> None:
    """Encoders default to the packaged model; decoders to the model the file names."""
    p.add_argument("--model", type=Path, default="default" if encodes else None, metavar="MODEL_DIR",
                   help="a MODEL_DIR from `ddcm convert` or `ddcm train`; default: the packaged model"
                   if encodes else "default: the model the file names, looked up by fingerprint")  # fmt: skip


def _comma_list(kind: Callable[[str], Any], choices: Sequence[str] | None = None) -> Callable[[str], list[Any]]:
    """An argparse type: "a,b,c" -> [kind(a), kind(b), kind(c)], each checked."""

    def parse(text: str) -> list[Any]:
        out = []
        for part in (x.strip() for x in text.split(",")):
            if choices is not None and part not in choices:
                raise argparse.ArgumentTypeError(f"{part!r} is not one of {', '.join(choices)}")
            try:
                out.append(kind(part))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part!r} is not a {kind.__name__}") from None
        if not out or len(set(out)) != len(out):
            raise argparse.ArgumentTypeError("give distinct values, separated by commas")
        return out

    return parse


def _coding(p: argparse.ArgumentParser, *, rules: bool = True, policy: bool = True, restore: bool = False,
            prompts: bool = True, points: bool = False) -> None:  # fmt: skip
    """The coding flags; `points` (eval): --quality and --bpp take comma lists, each one operating point."""
    from ddcm_jax.bitstream import CODEBOOK_GENERATORS  # NumPy only: --help stays fast

    g = p.add_argument_group("coding")
    if restore:
        g.add_argument("--rule", choices=["turbo", "ddcm"], default="turbo",
                       help="turbo (default: M signed atoms per step, scored against the measurement's residual "
                       "pulled back through the degradation, A^T(y - A(x0_hat))) or ddcm (one atom per step, "
                       "DDCM's MSE rule)")  # fmt: skip
        g.add_argument("--atoms", "-M", type=int, default=None, help="turbo's atoms per step M (default per task)")
    if points:
        g.add_argument("--quality", "-Q", type=_comma_list(str, list(QUALITY)), default=None, metavar="LEVEL,...",
                       help="operating points: quality levels (" + ", ".join(QUALITY) + "; default: all of them "
                       "for a pixel model, the defaults for a latent one); explicit flags below apply to each")  # fmt: skip
    elif rules:
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
    if points:
        g.add_argument("--bpp", type=_comma_list(float), default=None, metavar="B,...",
                       help="operating points: rate targets in bits per input pixel, each the largest payload not "
                       "above it (as compress --bpp)")  # fmt: skip
    if rules and not points:
        g.add_argument("--bpp", type=float, default=None, metavar="B",
                       help="target rate: per image, the operating point whose payload is the largest not above B "
                       "bits per input pixel (turbo: M, and a latent model's no-bits steps; ddcm: K and T)")  # fmt: skip
        g.add_argument("--psnr", type=float, default=None, metavar="P",
                       help="quality target: per image, the lowest-rate point (turbo: M = 1, 2, 4, ...; ddcm: "
                       "K = 2, 4, ..., 2^16) whose decoded image reaches P dB, by a binary search of real encodes "
                       "(about 1 + log2 of the number of points: 5 for turbo at K = 1024); reports what it reached")  # fmt: skip
    if rules:
        _latent_coding(g)
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


def _latent_coding(g: Any) -> None:
    g.add_argument("--no-bits-steps", type=int, default=None, metavar="NBS",
                   help="latent models: the last NBS steps before the final one carry no bits (turbo's "
                   "default: Turbo-DDCM's heuristic for the coded size; ddcm: 0)")  # fmt: skip
    g.add_argument("--schedule", choices=["ddcm", "turbo"], default=None,
                   help="latent models: the original DDCM's or Turbo-DDCM's timesteps (default: the rule's)")


DESCRIPTION = ("The `ddcm` command line: compress, decompress, roundtrip, generate, edit, restore, info, eval, "
               "train, convert.")


def build_parser() -> argparse.ArgumentParser:
    from ddcm_jax import __version__
    from ddcm_jax.convert import add_arguments as add_convert_arguments

    parser = argparse.ArgumentParser(prog="ddcm", description=DESCRIPTION)
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
    _output(p)
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
    _output(p)
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
                       description="Degrade each input by TASK (or, with --measured, take it as already "
                       "degraded), restore it by compressed posterior sampling, and write the restored image and "
                       "its .ddcm file.")  # fmt: skip
    _io(p)
    p.add_argument("--task", required=True, choices=["colorization", "super-resolution", "inpainting", "blur"])
    p.add_argument("--factor", type=int, default=4, help="super-resolution factor")
    p.add_argument("--blur-sigma", type=float, default=3.0, help="Gaussian blur std (pixels)")
    p.add_argument("--blur-kernel", type=int, default=61, help="Gaussian blur kernel size (odd)")
    p.add_argument("--mask", type=Path, help="inpainting mask image, white = observed (default: centre hole)")
    p.add_argument("--measured", action="store_true",
                   help="the inputs are already degraded photos (grey, blurred, holed, or low-resolution: the result "
                   "is --factor times larger), restored as they are; default: degrade clean inputs first and "
                   "compare the result with them (the evaluation mode)")  # fmt: skip
    _model_arg(p, True)
    _coding(p, rules=False, restore=True)
    _common(p)

    p = sub.add_parser("info", help="describe .ddcm files", description="Print what a .ddcm file holds.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="FILE")
    _common(p, distributed=False)

    p = sub.add_parser("eval", help="rate-distortion of our codec against JPEG, WebP, AVIF and JPEG XL",
                       usage="ddcm eval IMAGES... -o DIR [--model MODEL_DIR] [--quality LEVEL,...] [--bpp B,...] "
                       "[--codecs jpeg,webp,avif,jxl] [coding flags]\n       ddcm eval --plot JSON... -o DIR",
                       description="Code every image whole at each operating point into real .ddcm files, decode "
                       "them, and code the same images with the other codecs at a ladder of qualities and at our "
                       "bytes; measure bpp, PSNR, MS-SSIM, LPIPS and seconds; write DIR/<codec>.json (CompressAI's "
                       "schema), the rate-distortion plots and a figure. Resumes: what an earlier run made with the "
                       "same settings is reused. docs/evaluation.md gives the protocol.")  # fmt: skip
    p.add_argument("inputs", nargs="*", type=Path, metavar="IMAGES", help="images or folders of them")
    _output(p)
    p.add_argument("--plot", nargs="+", type=Path, metavar="JSON",
                   help="only redraw the plots into DIR from these results files (ours, or any in CompressAI's schema)")
    _model_arg(p, True)
    p.add_argument("--codecs", type=_comma_list(str, ["jpeg", "webp", "avif", "jxl", "none"]),
                   default=["jpeg", "webp", "avif", "jxl"], metavar="NAME,...",
                   help="the other codecs (jpeg, webp, avif, jxl; none for ours alone; default: all four)")
    p.add_argument("--scales", type=_comma_list(int), default=[1, 2, 3, 4, 6, 8], metavar="S,...",
                   help="down-scalings tried for the other codecs at our bytes (default 1,2,3,4,6,8)")
    p.add_argument("--figure-image", metavar="NAME",
                   help="the image of DIR/figure.png (default: the first)")
    _coding(p, points=True, prompts=True)
    _common(p, distributed=False)

    from ddcm_jax.train import add_arguments as add_train_arguments

    p = sub.add_parser("train", help="train an ADM diffusion model on the bundled photographs",
                       description="DDPM training of an ADM network; writes a MODEL_DIR (needs the train extra).")  # fmt: skip
    add_train_arguments(p)

    p = sub.add_parser("convert", help="convert a PyTorch checkpoint or a diffusers folder into a MODEL_DIR",
                       usage="ddcm convert CHECKPOINT -o MODEL_DIR (--config JSON | --preset NAME)\n"
                       "       ddcm convert PIPELINE_DIR -o MODEL_DIR [--format diffusers]",
                       description="Convert a guided-diffusion checkpoint, or a diffusers Stable Diffusion or FLUX.1 "
                       "folder (detected by its model_index.json; --format diffusers), into a MODEL_DIR (no torch "
                       "needed).")  # fmt: skip
    add_convert_arguments(p)
    for sp in sub.choices.values():  # a usage error found after parsing prints its command's usage
        sp.set_defaults(usage_parser=sp)
    return parser




class Coding(NamedTuple):
    """What the coding flags say: the code's spec, the seed and the size policy."""

    spec: Any  # ddcm_jax.spec.CodeSpec
    seed: int
    policy: str
    latent: bool = False
    num_timesteps: int | None = None  # the model's, when model.json says
    origin: str = "the defaults"  # where the settings the user did not give came from

    def describe(self, args: argparse.Namespace) -> str:
        """The operating point the flags chose, and why, in one line (what the encoding commands print first)."""
        from ddcm_jax import rate

        size = getattr(args, "size", None)
        where = f", {size} px ({self.policy})" if size else f" ({self.policy}, the model's size)"
        if getattr(args, "bpp", None) is not None:
            return (f"operating point: per image, the largest payload not above --bpp {args.bpp:g} at "
                    f"T {self.spec.steps}, K {self.spec.codebook_size}{where}")  # fmt: skip
        if getattr(args, "psnr", None) is not None:
            return (f"operating point: per image, the lowest rate reaching --psnr {args.psnr:g} dB, searched from "
                    f"{rate.describe_point(self.spec)}{where}")  # fmt: skip
        return f"operating point: {rate.describe_point(self.spec)}{where}; unset values from {self.origin}"

    def rate_note(self, args: argparse.Namespace, height: int, width: int, point: Any) -> str | None:
        """With --bpp: what it chose for an H0 x W0 input and whether the target was reached."""
        if getattr(args, "bpp", None) is None:
            return None
        from ddcm_jax import rate

        return rate.rate_note(self.spec, args.bpp, height, width, point, crop=self.policy == "crop",
                              latent=self.latent, schedule=getattr(args, "schedule", None),
                              max_steps=self.num_timesteps)  # fmt: skip

    def for_image(self, args: argparse.Namespace, height: int, width: int) -> Any:
        """The spec of one image: `spec`, or with --bpp the operating point for the pixels of its output
        (H0 x W0; crop: the centre square)."""
        if getattr(args, "bpp", None) is None:
            return self.spec
        from ddcm_jax import rate

        try:
            return rate.for_image(self.spec, args.bpp, height, width, crop=self.policy == "crop", latent=self.latent,
                                  schedule=getattr(args, "schedule", None), max_steps=self.num_timesteps)  # fmt: skip
        except rate.RateError as e:
            raise InputError(f"--bpp {args.bpp:g}: {e}") from None


def _settings(args: argparse.Namespace) -> Coding:
    """The coding flags as a `CodeSpec` plus seed and policy (`ddcm_jax.presets`); usage errors at once,
    the model's family and timesteps read from its model.json alone."""
    from ddcm_jax import families, presets
    from ddcm_jax.modeldir import peek_family

    def flag(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    family = None if flag("model") is None else peek_family(args.model)
    latent, rule = families.named_schedules(family), flag("rule", "turbo")
    turbo_targets = presets.rate_knob(rule) == "atoms"  # a target turns M (turbo), not K
    try:
        presets.check_targets(rule=rule, **{n: flag(n) for n in ("psnr", "bpp", "atoms", "codebook_size",
                                                                  "no_bits_steps")})  # fmt: skip
        if flag("bpp") is not None and turbo_targets:
            args.atoms = 1  # a placeholder: the target picks M
        given = {n: flag(n) for n in ("quality", "task", "steps", "codebook_size", "atoms", "size", "policy")}
        source = (f"the quality level {flag('quality') or DEFAULT_QUALITY!r}" if flag("quality") or
                  (args.command in presets.QUALITY_COMMANDS and not latent and flag("task") is None)
                  else "the defaults")  # fmt: skip
        origins = {field: source for field, name in (("steps", "steps"), ("codebook_size", "codebook_size"),
                                                     ("num_atoms", "atoms")) if given[name] is None}  # fmt: skip
        for name, value in presets.resolve(args.command, latent=latent, rule=rule, **given)._asdict().items():
            if hasattr(args, name):
                setattr(args, name, value)
        if flag("psnr") is not None and turbo_targets:  # the search starts at the level's M (rate.search)
            args.atoms = presets.psnr_start_atoms(args.atoms, args.codebook_size)
        presets.check_family_options(latent=latent, command=args.command, eta=args.eta,
                                     cfg_prompts=families.cfg_prompts(family), **{
            n: flag(n) for n in ("class_label", "prompt", "guidance", "ccfg_subset", "no_bits_steps", "schedule")})
        num_timesteps = None if flag("model") is None else families.peek_num_timesteps(args.model, family)
        spec = presets.code_spec(
            latent=latent, steps=args.steps, codebook_size=args.codebook_size, rule=flag("rule"),
            num_atoms=flag("atoms", 1), coef_bits=flag("coef_bits", 1), generator=args.generator, eta=args.eta,
            seed=args.seed, num_timesteps=num_timesteps, origins=origins,
            **{n: flag(n) for n in ("t_range", "no_bits_steps", "schedule", "ccfg_subset")})  # fmt: skip
        if flag("task") is not None:
            presets.check_task(factor=args.factor, blur_kernel=args.blur_kernel, blur_sigma=args.blur_sigma)
    except presets.PresetError as e:
        raise UsageError(str(e)) from None
    if flag("task") is not None:
        source = f"the {args.task} task's defaults"
    elif latent:
        source = "the latent defaults"
    return Coding(spec, args.seed, flag("policy", "fit"), latent, num_timesteps, source)


def _latent_kwargs(args: argparse.Namespace, spec: Any = None) -> dict[str, Any]:
    """The latent-only codec keywords the flags set (none for a pixel model: `presets.check_family_options` saw to it);
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
