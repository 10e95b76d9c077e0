"""The commands: compress / roundtrip / restore (`cmd_encode`), generate, decompress, info, edit."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddcm_jax.cli._parser import Coding, _ccfg, _latent_kwargs, _settings
from ddcm_jax.cli._runs import (
    InputError,
    Job,
    Run,
    UsageError,
    _expand,
    _finite,
    _groups,
    _init_distributed,
    _my_share,
    _process_index,
    _read_limited,
)
from ddcm_jax.printable import printable


def _load_model(path: Path) -> Any:
    """The package's `ddcm_jax.cli._load_model`, looked up at each call (the one name to replace)."""
    return sys.modules[__package__]._load_model(path)


def _model_of(head: Any, given: Path | None, models: dict[Path, Any], name: str, budget: int,
              prompt: str | None) -> Path:  # fmt: skip
    """The MODEL_DIR of a file's header: `given`, else the known one its fingerprint names; loaded once
    into `models`, checked against the header (and `prompt`) before the payload is decoded."""
    from ddcm_jax import codec
    from ddcm_jax.families import find_model

    where = given or find_model(head.model.fingerprint_hex, models)
    if where is None:
        from ddcm_jax.families import label_of_file
        from ddcm_jax.modeldir import registry_path

        family = label_of_file(head.model.noise_schedule)
        raise InputError(f"{name}: needs the {family} model {head.model.fingerprint_hex}…, not among the known models "
                         f"(the packaged ones, those `ddcm convert` listed in {printable(registry_path())}, "
                         "DDCM_MODELS); pass --model MODEL_DIR")  # fmt: skip
    if where not in models:
        models[where] = _load_model(where)
    codec.check_model(head, models[where], name, budget=budget)
    codec.check_prompt(head, prompt, name)
    return where


def _record(enc: Any, source: Path | None, outputs: list[Path], seconds: float, **extra: Any) -> dict[str, Any]:
    return {"file": None if source is None else str(source), "outputs": [str(p) for p in outputs], **enc.rates(),
            "seconds": round(seconds, 3), **extra}  # fmt: skip


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
            if args.command == "restore" and not args.measured:
                run.claim(_degraded_path(job.stem), job.source)
            pixels, notes = images.load_image(job.source, budget=budget)
            for note in notes:
                run.say(f"note: {job.source}: {note}")
            h0, w0 = pixels.shape[:2]
            if getattr(args, "measured", False) and args.task == "super-resolution":
                h0, w0 = h0 * args.factor, w0 * args.factor  # the result of a low-resolution photo
            # The decoded image comes back at the input's geometry: resampled and, maybe, written.
            memory.check_host("resample", h0, w0, what=str(job.source), budget=budget)
            if writes_png:
                memory.check_host("png", h0, w0, what=str(job.source), budget=budget)
            side = codec.coding_side(model, args.policy, args.size)
            coded = images.coded_size((h0, w0), args.policy, side, codec.size_multiple(model))
            spec = coding.for_image(args, h0, w0)
            rate_line = coding.rate_note(args, h0, w0, spec)
            if rate_line is not None:
                run.say(f"note: {job.source}: {rate_line}")
                notes = [*notes, rate_line]
            loaded.append(_Loaded(job, pixels, notes, coded, t0, spec))
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
                if enc.degraded is not None and not getattr(args, "measured", False):
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
                    run.say(_restore_line(item.job.source, out_ddcm, rec, args.measured))
                elif not decode_back:
                    run.say(f"{item.job.source} -> {out_ddcm} ({rec['bytes']} bytes, {rec['bpp']:.4f} bpp)")
            except Exception as e:
                run.fail(item.job.source, e)
            run.done()


def _psnr_search(args: argparse.Namespace, run: Run, model: Any, item: _Loaded, encode: Callable[..., Any],
                 budget: int) -> Any:  # fmt: skip
    """--psnr P: `rate.quality_target` with real encodes against the input; its note said and kept."""
    import math

    from ddcm_jax import metrics, rate

    # One bar over the whole search: at most 2 + log2(points) tries of T steps each (`rate.search`), so
    # its ETA is the search's (an upper bound: a target found early ends it sooner).
    steps = item.spec.steps
    most = 2 + math.ceil(math.log2(max(2, len(rate.ladder(item.spec)))))
    bar = run._bar(most * steps, f"--psnr {args.psnr:g}", "step", leave=False)
    tries: list[Any] = []

    def encode_and_measure(point: Any, i: int, n: int) -> tuple[Any, float]:
        tries.append(point)
        base = (len(tries) - 1) * steps
        if bar is not None:
            bar.set_description(f"--psnr {args.psnr:g}, try {len(tries)}: {point.rule.knob_label(point)}")

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.update(base + done * steps // max(1, total) - bar.n)

        enc = encode(model, [item.pixels], point, budget, progress)[0]
        return enc, metrics.psnr(enc.reference, enc.decoded)

    try:
        found = rate.quality_target(item.spec, args.psnr, encode_and_measure, item.spec)
    finally:
        if bar is not None:
            bar.close()
    note = found.note(len(found.result.data))
    run.say(f"note: {item.job.source}: {note}")
    item.notes.append(note)  # and into the JSON summary's notes
    return found.result


def _degraded_path(stem: Path) -> Path:
    return stem.with_name(stem.name + "_degraded.png")


def _restore_line(source: Path, out: Path, rec: dict[str, Any], measured: bool = False) -> str:
    """What `restore` prints per image: the files, the rate, agreement with the measurement and the original."""
    c, p, lp = rec.get("consistency_psnr"), rec.get("psnr"), rec.get("lpips")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    if measured:
        return (f"{source} -> {out.with_suffix('.png')} ({rec['bytes']} bytes, {rec['bpp']:.4f} bpp); "
                f"consistency with the measured input {fmt(c, '.2f')} dB")  # fmt: skip
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
    if jobs:
        run.say(coding.describe(args))
    task: dict[str, Any] = {}
    if args.command == "restore":
        task = dict(task=args.task, factor=args.factor, blur_sigma=args.blur_sigma, blur_kernel=args.blur_kernel,
                    mask=_load_mask(args.mask) if args.mask is not None else None, measured=args.measured)  # fmt: skip

    def encode(model: Any, pixel_list: list[Any], spec: Any, budget: int, progress: Any) -> Any:
        return codec.encode_images(model, pixel_list, spec, seed=coding.seed, size_policy=coding.policy,
                                   coding_size=args.size, budget=budget, progress=progress, **task,
                                   **_latent_kwargs(args, spec))  # fmt: skip

    if jobs:
        _encode_jobs(args, run, jobs, encode, decode_back=args.command in ("roundtrip", "restore"), coding=coding)
    code = run.finish()
    if args.command == "roundtrip":
        _table(run)
    return code


def _load_mask(path: Path) -> Any:
    from ddcm_jax.images import load_mask

    try:
        return load_mask(path)
    except ValueError as e:
        raise UsageError(f"--mask {e}") from None


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
    free = []
    for sd in seeds:  # outputs that exist are refused before anything is generated (unless --overwrite)
        stem = args.output / f"gen_{sd - base.seed:0{width}d}"
        try:
            for suffix in (".ddcm", ".png"):
                run.claim(stem.with_suffix(suffix), stem)
            free.append(sd)
        except InputError as e:
            run.fail(stem, e)
            run.done()
    for group in _groups(free, lambda _: 0, jax.local_device_count()):
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
            where = _model_of(head, args.model, models, name, budget, args.prompt)
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


def cmd_info(args: argparse.Namespace) -> int:
    from ddcm_jax import bitstream, codec

    run = Run("info", argparse.Namespace(**{**vars(args), "quiet": True}), 0)
    for path in args.inputs:
        name = printable(path)
        try:
            data = _read_limited(path)
            # Everything info prints is in the header: the payload's code is not decoded.
            d = codec.describe(bitstream.decode_header(data, name), len(data))
        except Exception as e:
            run.fail(name, e)
            continue
        run.records.append({"file": str(path), **d})
        if not args.quiet:
            t = "all steps" if d["t_range"] is None else f"t in [{d['t_range'][0]}, {d['t_range'][1]}]"
            extra = f", M {d['num_atoms']}" + (f", C {d['coef_bits']}" if d["coef_bits"] else "")
            print(f"{name}: {d['bpp_input']:.4f} bpp over the {d['original_size'][1]}x{d['original_size'][0]} "
                  f"input ({d['bpp_payload_input']:.4f} payload only)\n"
                  f"  .ddcm v{d['format_version']}, {d['bytes']} bytes = {d['header_bytes']} header + "
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
                model = models[_model_of(head, args.model, models, name, budget, args.prompt)]
                stream = bitstream.decode(data, name)
                enc = None
            else:
                if args.model not in models:
                    models[args.model] = _load_model(args.model)
                model = models[args.model]
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


def cmd_eval(args: argparse.Namespace) -> int:
    from ddcm_jax.cli._eval import cmd_eval as run

    return run(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "edit": cmd_edit,
    "eval": cmd_eval,
    "compress": cmd_encode,
    "roundtrip": cmd_encode,
    "restore": cmd_encode,
    "generate": cmd_generate,
    "decompress": cmd_decompress,
    "info": cmd_info,
}
