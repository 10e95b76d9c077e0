"""`ddcm eval`: the operating points from the flags, one progress bar, the summary; the protocol is
`ddcm_jax.evaluation`'s."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

from ddcm_jax.cli._parser import _latent_kwargs, _settings
from ddcm_jax.cli._runs import InputError, UsageError, _expand
from ddcm_jax.printable import printable

# The coding flags that change a point; given explicitly, they name the point's folder.
_POINT_FLAGS = (("steps", "T"), ("codebook_size", "K"), ("atoms", "M"), ("rule", ""), ("seed", "seed"),
                ("size", "px"), ("policy", ""), ("no_bits_steps", "nbs"), ("schedule", "sched"), ("generator", ""),
                ("coef_bits", "C"), ("eta", "eta"))  # fmt: skip


def _points(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> list[Any]:
    """One `OurPoint` per --quality level and --bpp target (default: every level, or the defaults of a
    latent model), each resolved exactly as `ddcm compress` resolves its flags."""
    from ddcm_jax import families, presets
    from ddcm_jax.evaluation import OurPoint
    from ddcm_jax.modeldir import peek_family

    latent = families.named_schedules(peek_family(args.model))
    wanted: list[tuple[str, dict[str, Any]]] = []
    for level in args.quality or []:
        wanted.append((level, {"quality": level, "bpp": None}))
    for b in args.bpp or []:
        wanted.append((f"bpp{b:g}", {"quality": None, "bpp": b}))
    if not wanted:
        wanted = [("default", {"quality": None, "bpp": None})] if latent else [
            (level, {"quality": level, "bpp": None}) for level in presets.QUALITY]  # fmt: skip
    suffix = "".join(f"_{short}{getattr(args, name)}" for name, short in _POINT_FLAGS
                     if getattr(args, name, None) != parser_defaults.get(name))  # fmt: skip
    points = []
    for label, flags in wanted:
        ns = copy.copy(args)
        ns.command = "compress"
        for k, v in flags.items():
            setattr(ns, k, v)
        coding = _settings(ns)

        def spec_for(h: int, w: int, ns: argparse.Namespace = ns, coding: Any = coding) -> Any:
            return coding.for_image(ns, h, w)

        kwargs = _latent_kwargs(ns, spec_for(512, 768))  # the keywords do not depend on the size
        decode = {"prompt": ns.prompt} if getattr(ns, "prompt", None) else {}
        points.append(OurPoint((label + suffix).replace("/", "_"), spec_for, coding.seed, coding.policy, ns.size,
                               kwargs, decode))  # fmt: skip
    return points


def cmd_eval(args: argparse.Namespace) -> int:
    from ddcm_jax import evaluation

    if args.plot:
        return _replot(args)
    if not args.inputs:
        raise UsageError("give IMAGES (files or folders), or --plot JSON...")
    from ddcm_jax.cli import _commands
    from ddcm_jax.cli._parser import build_parser

    defaults = vars(build_parser().parse_args(["eval", "x", "-o", "y"]))
    codecs = [] if args.codecs == ["none"] else args.codecs
    if "none" in codecs:
        raise UsageError("--codecs none stands alone")
    if args.policy == "crop":
        raise UsageError("--crop codes the centre square; eval codes every image whole (crop the images first)")
    if any(s < 1 for s in args.scales) or 1 not in args.scales:
        raise UsageError("--scales are positive whole factors and include 1")
    from ddcm_jax import baselines

    for c in codecs:
        reason = baselines.BASELINES[c].missing_reason()
        if reason:
            raise UsageError(f"--codecs {c}: {reason}")
    points = _points(args, defaults)
    from ddcm_jax.images import IMAGE_SUFFIXES, load_image

    jobs, errors = _expand(args.inputs, args.output, IMAGE_SUFFIXES)
    for e in errors:
        print(f"ddcm eval: {printable(e)}", file=sys.stderr)
    items = []
    for job in jobs:
        try:
            pixels, _ = load_image(job.source)
        except (ValueError, OSError) as e:
            errors.append(str(e))
            print(f"ddcm eval: {printable(str(e).splitlines()[0])}", file=sys.stderr)
            continue
        items.append((job.stem.relative_to(args.output).as_posix(), pixels))
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise UsageError("two inputs have the same name; give them in separate folders")
    model = _commands._load_model(args.model)
    say = (lambda line: None) if args.quiet else None
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=0, desc="eval", unit="s of work", file=sys.stderr, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")  # fmt: skip
        say = bar.write
    def error(line: str) -> None:
        line = f"ddcm eval: {printable(line)}"
        bar.write(line, file=sys.stderr) if bar is not None else print(line, file=sys.stderr)

    ev = evaluation.Evaluation(args.output, model, points, codecs=codecs, scales=args.scales,
                               overwrite=args.overwrite, progress=None if bar is None else bar.update,
                               say=say, error=error, steps=None if bar is None else _steps(bar))  # fmt: skip
    if bar is not None:
        bar.total = ev.total_work(px.shape[:2] for _, px in items)
        bar.refresh()
    args.output.mkdir(parents=True, exist_ok=True)
    try:
        ev.run(items)
        written = ev.write_results()
        curves = [evaluation.read_results(p) for p in written.values()]
        plots = evaluation.draw_rd(curves, args.output, title=f"{len(items)} images")
        figure = None
        if items and ev.points:
            pick = args.figure_image or items[0][0]
            chosen = dict(items).get(pick)
            if chosen is None:
                raise InputError(f"--figure-image {printable(pick)}: not among the images")
            figure = evaluation.draw_figure(ev, pick, chosen, args.output / "figure.png")
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        _summary(ev, written, plots, figure)
    if args.json is not None:
        import json

        from ddcm_jax.images import write_report

        write_report(args.json, (json.dumps({"command": "eval", "failed": len(ev.failures) + len(errors),
                                             "results": {c: str(p) for c, p in written.items()},
                                             "reused": ev.reused}, indent=2) + "\n").encode())  # fmt: skip
    return 1 if ev.failures or errors else 0


def _steps(bar: Any) -> Any:
    """The current encode / decode shown in the bar's postfix ("high: encode 12/40"), one bar in all."""
    import contextlib

    @contextlib.contextmanager
    def steps(what: str) -> Any:
        def progress(done: int, total: int) -> None:
            bar.set_postfix_str(f"{what} {done}/{total}", refresh=True)

        yield progress
        bar.set_postfix_str("", refresh=False)

    return steps


def _summary(ev: Any, written: dict[str, Path], plots: list[Path], figure: Path | None) -> None:
    results = ev.results()
    print(f"{'codec':<10}{'point':<28}{'bpp':>8}{'PSNR':>8}{'MS-SSIM':>9}{'LPIPS':>8}{'enc s':>8}{'dec s':>8}")
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for c, res in results.items():
        r = res["results"]
        for i, point in enumerate(r["point"]):
            print(f"{c:<10}{point:<28}{f(r['bpp'][i], '.4f'):>8}{f(r['psnr'][i], '.2f'):>8}"
                  f"{f(r['ms-ssim'][i], '.4f'):>9}{f(r['lpips'][i], '.4f'):>8}{f(r['encoding_time'][i], '.2f'):>8}"
                  f"{f(r['decoding_time'][i], '.2f'):>8}")  # fmt: skip
        for point, s in res.get("same_bytes", {}).items():
            print(f"{c:<10}{point:<28}{f(s['bpp'], '.4f'):>8}{f(s['psnr'], '.2f'):>8}{f(s['ms-ssim'], '.4f'):>9}"
                  f"{f(s['lpips'], '.4f'):>8}   fits {s['fits']}/{s['images']}; ours better: PSNR "
                  f"{s['ours_better_psnr']}, LPIPS {s['ours_better_lpips']}")  # fmt: skip
    print("results: " + ", ".join(printable(p) for p in written.values()))
    if plots:
        print("plots: " + ", ".join(printable(p) for p in plots) + (f", {printable(figure)}" if figure else ""))
    if ev.reused:
        print(f"(reused {ev.reused} results of an earlier run)")


def _replot(args: argparse.Namespace) -> int:
    from ddcm_jax import evaluation

    if args.inputs:
        raise UsageError("--plot redraws from results files alone; give no IMAGES with it")
    try:
        curves = [evaluation.read_results(p) for p in args.plot]
    except evaluation.EvalError as e:
        print(f"ddcm eval: {printable(str(e))}", file=sys.stderr)
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    plots = evaluation.draw_rd(curves, args.output)
    if not args.quiet:
        print("plots: " + ", ".join(printable(p) for p in plots))
    return 0
