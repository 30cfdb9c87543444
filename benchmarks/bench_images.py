"""One image's work, `pmd.images.process_image`, beside img2dataset's Resizer doing the same job, its floor and its
quality; the cost of the evaluation-image screen; the scaled JPEG decoders it was chosen from.

Both take the same JPEG bytes and return a JPEG whose shorter side is 256 px (aspect kept, quality 95): ours with
simplejpeg (power-of-two DCT-scaled decode), exact halvings + bicubic to 2x the target + a 2x2 mean
(`pmd.images._antialiased`), OpenCV's encode, sha256, img2dataset with OpenCV (full decode, INTER_AREA, encode).
Images, per size (500x375, 640x480, 1024x768, 2048x1536), JPEG q90:
- "texture": generated, gradients plus 1/f noise over five octaves plus pixel noise (photo-like JPEG sizes and
  detail at every scale);
- "photo": real photographs cropped to 4:3 and resized (LANCZOS) to the size: matplotlib's grace_hopper.jpg (always
  installed) and every photo of the folders given with --photos (e.g. scikit-image's wheel: see
  benchmarks/eval_overlap_threshold.py for the unzip command). Photos smaller than the size are upscaled, so their
  large versions are smoother than a camera's.

Modes (all by default):
- speed: rounds alternate between pmd, pmd with the pHash (`with_phash=True`), img2dataset and the floor
  (simplejpeg's decode at the same scale + the JPEG encode of an output-sized image, nothing else), the order
  rotated each round; one process, one core; median per-image time of the rounds and the ratios.
- workers: speed's pmd, img2dataset and floor, each in a fresh process per round (order rotated), the images read
  from files: the state of a download worker. A process that has freed one very large block (here: generating the
  images with Pillow, whose image blocks are 16 MiB) keeps glibc's later large blocks in its heap; a worker has
  not, so there every freed block over 128 KiB goes back to the kernel and comes back as new zeroed pages (page
  faults per image are reported beside the time).
- quality: mean PSNR (RGB) and SSIM (luma, Gaussian window 11/1.5) of pmd's and img2dataset's output against a
  reference: full decode + Pillow LANCZOS to the same size.
- screen: the added cost per image of the pHash screen: hashing the held pixels (`phash_pixels`), and one check
  against 10,000 and 100,000 evaluation hashes; beside the former way (decode the stored JPEG, hash it, check).
- filters: the resize alone on the decoded pixels: one INTER_AREA (uint8, img2dataset's; float32) against
  process_image's steps (`_antialiased`), time and PSNR after the encode.
- decoders: each scaled decoder that is importable (Pillow draft, OpenCV IMREAD_REDUCED, simplejpeg with its M/8
  choice and restricted to powers of two, PyTurboJPEG, pyvips) decoding to a shorter side >= 256, then INTER_AREA
  to the target: time and PSNR to the reference.
Run: python benchmarks/bench_images.py [--rounds 9] [--images 12] [--photos DIR] [--modes speed workers quality ...]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from pmd.decontaminate import EvalHashIndex, phash_bytes, phash_pixels
from pmd.images import ImageOptions, _antialiased, _draft_scale, _target_size, process_image

SIZES = ((500, 375), (640, 480), (1024, 768), (2048, 1536))
TARGET = 256
OPTIONS = ImageOptions(image_size=TARGET, jpeg_quality=95)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
MIN_PHOTO_SIDE = 256  # icons and tiny test patterns say nothing about photos


def _jpeg(pixels: np.ndarray | Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    (pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def texture(width: int, height: int, seed: int) -> bytes:
    """Gradients + 1/f noise (octaves 4..64 px cells, amplitude halving) + pixel noise: detail at every scale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([x / width, y / height, (x + y) / (width + height)], axis=2) * 110
    amplitude = 70.0
    for cells in (4, 8, 16, 32, 64):
        grid = rng.integers(0, 256, (max(2, height * cells // width), cells, 3), dtype=np.uint8)
        layer = np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        pixels += (layer - 128) * (amplitude / 128)
        amplitude /= 2
    pixels += rng.normal(0, 5, (height, width, 3)) + 70
    return _jpeg(pixels.clip(0, 255).astype(np.uint8))


def photo(source: Image.Image, width: int, height: int) -> bytes:
    w, h = source.size
    cw, ch = (w, w * height // width) if w * height <= h * width else (h * width // height, h)
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    return _jpeg(source.convert("RGB").crop(box).resize((width, height), Image.Resampling.LANCZOS))


def load_photos(folders: list[Path]) -> list[Image.Image]:
    import matplotlib

    paths = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    for folder in folders:
        paths += sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    photos = []
    for path in paths:
        with Image.open(path) as im:
            if min(im.size) >= MIN_PHOTO_SIDE and im.mode in ("RGB", "L", "RGBA"):
                photos.append(im.convert("RGB"))
    return photos


def sets_for(width: int, height: int, count: int, photos: list[Image.Image]) -> dict[str, list[bytes]]:
    sets = {"texture": [texture(width, height, seed) for seed in range(count)]}
    if photos:
        sets["photo"] = [photo(photos[i % len(photos)], width, height) for i in range(max(count, len(photos)))]
    return sets


# ------------------------------------------------------------------------------------------------ the contenders
def pmd(data: bytes) -> bytes:
    return process_image(data, OPTIONS).data


def pmd_phash(data: bytes) -> bytes:
    return process_image(data, OPTIONS, with_phash=True).data


def img2dataset_resizer() -> Callable[[bytes], bytes]:
    from img2dataset.resizer import Resizer

    resizer = Resizer(image_size=TARGET, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_quality=95)

    def run(data: bytes) -> bytes:
        out, _, _, _, _, error = resizer(io.BytesIO(data))
        assert error is None, error
        return out

    return run


_FLOOR_BUFFER = np.empty(32 * 1024**2, np.uint8)


def floor(data: bytes) -> bytes:
    """The chosen codecs' part alone: simplejpeg's decode at the scale process_image picks (into one kept buffer, as
    process_image's), and OpenCV's JPEG encode of an image of the output's size (the decoded one cut to it: no
    resize, no checks, no hash)."""
    import simplejpeg

    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    scale = _draft_scale(w, h, OPTIONS)
    kw = {} if scale == 1 else {("min_height" if h <= w else "min_width"): -(-min(w, h) // scale)}
    pixels = simplejpeg.decode_jpeg(data, "BGR", fastupsample=True, buffer=_FLOOR_BUFFER, **kw)
    tw, th = _target_size(w, h, TARGET)
    return cv2.imencode(".jpg", np.ascontiguousarray(pixels[:th, :tw]), (cv2.IMWRITE_JPEG_QUALITY, 95))[1].tobytes()


def _rounds(contenders: dict[str, Callable[[bytes], object]], images: list[bytes], rounds: int) -> dict[str, float]:
    """Median per-image milliseconds; the order of the contenders rotates each round."""
    names = list(contenders)
    for fn in contenders.values():  # warm (imports, codec tables)
        fn(images[0])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = contenders[name]
            start = time.perf_counter()
            for data in images:
                fn(data)
            times[name].append((time.perf_counter() - start) * 1000 / len(images))
    return {n: statistics.median(v) for n, v in times.items()}


def speed(all_sets: dict, rounds: int) -> None:
    contenders = {"pmd": pmd, "pmd+phash": pmd_phash, "img2dataset": img2dataset_resizer(), "floor": floor}
    print(f"{'size':>10} {'images':>8} | ms per image: pmd / +phash / img2dataset / floor | "
          "pmd speed-up over img2dataset | pmd / floor")
    for (width, height), sets in all_sets.items():
        for kind, images in sets.items():
            m = _rounds(contenders, images, rounds)
            print(f"{width:>5}x{height:<4} {kind:>8} | {m['pmd']:.2f} / {m['pmd+phash']:.2f} / {m['img2dataset']:.2f}"
                  f" / {m['floor']:.2f} | {m['img2dataset'] / m['pmd']:.2f}x | {m['pmd'] / m['floor']:.2f}",
                  flush=True)


WORKER_CONTENDERS = ("pmd", "img2dataset", "floor")
WORKER_PASSES = 5  # passes over a set inside one worker; the worker reports their median


def _worker(name: str, folder: Path) -> None:
    """One contender over every set under `folder` (one sub-folder per size and set), in this fresh process: prints
    `SET MS_PER_IMAGE FAULTS_PER_IMAGE` per set."""
    cv2.setNumThreads(1)
    fn = {"pmd": pmd, "img2dataset": img2dataset_resizer, "floor": floor}[name]
    fn = fn() if name == "img2dataset" else fn
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = [p.read_bytes() for p in sorted(sub.iterdir())]
        fn(images[0])
        times, faults = [], []
        for _ in range(WORKER_PASSES):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for data in images:
                fn(data)
            times.append((time.perf_counter() - start) * 1000 / len(images))
            faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / len(images))
        print(sub.name, statistics.median(times), statistics.median(faults), flush=True)


def workers(all_sets: dict, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="pmd-bench-images-") as tmp:
        for (width, height), sets in all_sets.items():
            for kind, images in sets.items():
                sub = Path(tmp) / f"{width:04d}x{height}-{kind}"
                sub.mkdir()
                for i, data in enumerate(images):
                    (sub / f"{i:04d}.jpg").write_bytes(data)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                            os.environ.get("PYTHONPATH", "")])}
        figures: dict[str, dict[str, list[tuple[float, float]]]] = {n: {} for n in WORKER_CONTENDERS}
        for r in range(rounds):
            names = WORKER_CONTENDERS[r % 3:] + WORKER_CONTENDERS[:r % 3]
            for name in names:
                out = subprocess.run([sys.executable, __file__, "--worker", name, tmp], env=env, check=True,
                                     capture_output=True, text=True).stdout
                for line in out.splitlines():
                    key, ms, faults = line.split()
                    figures[name].setdefault(key, []).append((float(ms), float(faults)))
    print(f"{'size':>10} {'images':>8} | fresh worker, ms per image (page faults): pmd / img2dataset / floor | "
          "pmd speed-up over img2dataset | pmd / floor")
    for key in sorted(figures["pmd"]):
        m = {n: statistics.median(ms for ms, _ in figures[n][key]) for n in WORKER_CONTENDERS}
        f = {n: statistics.median(pf for _, pf in figures[n][key]) for n in WORKER_CONTENDERS}
        size, kind = key.split("-")
        print(f"{size.lstrip('0'):>10} {kind:>8} | {m['pmd']:.2f} ({f['pmd']:.0f}) / {m['img2dataset']:.2f} "
              f"({f['img2dataset']:.0f}) / {m['floor']:.2f} ({f['floor']:.0f}) | {m['img2dataset'] / m['pmd']:.2f}x | "
              f"{m['pmd'] / m['floor']:.2f}", flush=True)


# ------------------------------------------------------------------------------------------------ quality
def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def reference(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(im.resize(_target_size(im.size[0], im.size[1], TARGET), Image.Resampling.LANCZOS))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 on BT.601 luma, Gaussian window sigma 1.5 (truncated at 11 px), K1 0.01, K2 0.03."""
    weights = np.array([0.299, 0.587, 0.114])
    x, y = a.astype(np.float64) @ weights, b.astype(np.float64) @ weights
    blur = lambda v: gaussian_filter(v, 1.5, truncate=3.5)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].mean())


def quality(all_sets: dict) -> None:
    peer = img2dataset_resizer()
    print(f"{'size':>10} {'images':>8} | PSNR dB pmd / img2dataset | SSIM pmd / img2dataset "
          "(vs full decode + LANCZOS)")
    for (width, height), sets in all_sets.items():
        for kind, images in sets.items():
            refs = [reference(d) for d in images]
            scores = {name: [(psnr(_rgb(fn(d)), r), ssim(_rgb(fn(d)), r)) for d, r in zip(images, refs)]
                      for name, fn in (("pmd", pmd), ("img2dataset", peer))}
            mean = {n: np.mean(np.array(v), axis=0) for n, v in scores.items()}
            print(f"{width:>5}x{height:<4} {kind:>8} | {mean['pmd'][0]:.2f} / {mean['img2dataset'][0]:.2f} | "
                  f"{mean['pmd'][1]:.4f} / {mean['img2dataset'][1]:.4f}", flush=True)


# ------------------------------------------------------------------------------------------------ screen
def screen_cost(images: list[bytes], rounds: int) -> None:
    rng = np.random.default_rng(0)
    stored = [process_image(d, OPTIONS, with_phash=True) for d in images]
    print("evaluation screen, ms per image:")
    for n in (10_000, 100_000):
        hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
        index = EvalHashIndex(hashes, [str(i) for i in range(n)], np.zeros(n, np.int32), ["eval"])
        m = _rounds({"check": lambda d, i=index: [i.check_hash(s.phash) for s in stored],
                     "former (decode stored + hash + check)": lambda d, i=index: [i.check_bytes(s.data)
                                                                                 for s in stored]},
                    [b""], rounds)
        print(f"  {n:>7} hashes: check {m['check'] / len(stored):.3f}; former way "
              f"{m['former (decode stored + hash + check)'] / len(stored):.3f}")
    held = [_rgb_image(s.data) for s in stored]  # the stage's pixels have this size (341x256); any will do
    m = _rounds({"pixels": lambda d: [phash_pixels(im) for im in held],
                 "stored": lambda d: [phash_bytes(s.data) for s in stored]}, [b""], rounds)
    print(f"  hashing the held pixels (phash_pixels): {m['pixels'] / len(held):.3f}; "
          f"decoding and hashing the stored JPEG (the former way): {m['stored'] / len(held):.3f}")


def _rgb_image(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im.load()
    return im


# ------------------------------------------------------------------------------------------------ decoders
def _decoders() -> dict[str, Callable[[bytes], np.ndarray]]:
    """Scaled decoders to RGB arrays with a shorter side >= TARGET, for those libraries that are importable."""
    def pillow(data):
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", _target_size(im.size[0], im.size[1], TARGET))
        return np.asarray(im.convert("RGB"))

    def opencv(data):
        h, w = Image.open(io.BytesIO(data)).size[::-1]
        flag = next((f for s, f in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                    (2, cv2.IMREAD_REDUCED_COLOR_2)) if min(w, h) // s >= TARGET), cv2.IMREAD_COLOR)
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), flag), cv2.COLOR_BGR2RGB)

    found = {"pillow draft": pillow, "opencv IMREAD_REDUCED": opencv}
    try:
        import simplejpeg

        def sj(data, power_of_two=False):
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            short = min(w, h)
            need = TARGET
            if power_of_two:
                need = -(-short // next(s for s in (8, 4, 2, 1) if -(-short // s) >= TARGET))
            return simplejpeg.decode_jpeg(data, "RGB", **({"min_height": need} if h <= w else {"min_width": need}))

        found["simplejpeg M/8"] = sj
        found["simplejpeg 1/2^k"] = lambda d: sj(d, True)
    except ImportError:
        pass
    try:
        from turbojpeg import TurboJPEG

        turbo = TurboJPEG()
        factors = sorted((f for f in turbo.scaling_factors if f[0] <= f[1]), key=lambda f: f[0] / f[1])

        def tj(data):
            w, h, _, _ = turbo.decode_header(data)
            factor = next(f for f in factors if -(-min(w, h) * f[0] // f[1]) >= TARGET)
            return turbo.decode(data, pixel_format=0, scaling_factor=factor)

        found["pyturbojpeg M/8"] = tj
    except (ImportError, RuntimeError, OSError):  # RuntimeError/OSError: the wrapper without a system libturbojpeg
        pass
    try:
        os.environ.setdefault("VIPS_CONCURRENCY", "1")
        import pyvips

        pyvips.cache_set_max(0)

        def vips(data):
            im = pyvips.Image.new_from_buffer(data, "")
            tw, th = _target_size(im.width, im.height, TARGET)
            out = pyvips.Image.thumbnail_buffer(data, tw, height=th, size="down")  # shrink-on-load + lanczos3
            return np.ndarray(buffer=out.write_to_memory(), dtype=np.uint8, shape=(out.height, out.width, 3))

        found["pyvips thumbnail"] = vips
    except (ImportError, OSError):
        pass
    return found


def decoders(all_sets: dict, rounds: int) -> None:
    found = _decoders()
    print("scaled decode to a shorter side >= 256, then INTER_AREA to the target: ms per image (decode + resize) "
          "and PSNR dB to full decode + LANCZOS (before any encode)")
    for (width, height), sets in all_sets.items():
        images = sets["texture"]
        refs = [reference(d) for d in images]
        target = _target_size(width, height, TARGET)

        def full(dec, target=target):
            return lambda data: cv2.resize(dec(data), target, interpolation=cv2.INTER_AREA)

        m = _rounds({name: full(dec) for name, dec in found.items()}, images, rounds)
        shapes = {name: dec(images[0]).shape[:2] for name, dec in found.items()}
        quality_ = {name: np.mean([psnr(full(dec)(d), r) for d, r in zip(images, refs)]) for name, dec in found.items()}
        print(f"{width:>5}x{height:<4} " + " | ".join(
            f"{name} {shapes[name][1]}x{shapes[name][0]}: {m[name]:.2f} ms {quality_[name]:.1f} dB" for name in found),
            flush=True)


# ------------------------------------------------------------------------------------------------ filters
def filters(all_sets: dict, rounds: int) -> None:
    """The resize alone, on the pixels process_image decodes (same scale): one INTER_AREA on uint8 (img2dataset's),
    the same on float32 (OpenCV's vectorised float path, same output), and pmd's steps; then PSNR after the q95
    encode to full decode + LANCZOS."""
    import simplejpeg

    def encode(pixels):
        return cv2.imencode(".jpg", pixels, (cv2.IMWRITE_JPEG_QUALITY, 95))[1].tobytes()

    contenders = {
        "INTER_AREA": lambda p, t: cv2.resize(p, t, interpolation=cv2.INTER_AREA),
        "INTER_AREA float32": lambda p, t: np.rint(cv2.resize(p.astype(np.float32), t, interpolation=cv2.INTER_AREA)
                                                   ).astype(np.uint8),
        "pmd steps": _antialiased,
    }
    print("resize alone on the decoded pixels: ms per image | PSNR dB after encode (vs full decode + LANCZOS)")
    for (width, height), sets in all_sets.items():
        scale = _draft_scale(width, height, OPTIONS)
        kw = {} if scale == 1 else {"min_height": -(-height // scale)}
        target = _target_size(width, height, TARGET)
        for kind, images in sets.items():
            pixels = [simplejpeg.decode_jpeg(d, "BGR", fastupsample=True, **kw) for d in images]
            refs = [reference(d) for d in images]
            m = _rounds({n: (lambda _, f=f, px=pixels, t=target: [f(p, t) for p in px]) for n, f in contenders.items()},
                        [b""], rounds)
            scores = {n: np.mean([psnr(_rgb(encode(f(p, target))), r) for p, r in zip(pixels, refs)])
                      for n, f in contenders.items()}
            print(f"{width:>5}x{height:<4} {kind:>8} | " + " | ".join(
                f"{n} {m[n] / len(pixels):.2f} ms {scores[n]:.2f} dB" for n in contenders), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--images", type=int, default=12, help="generated images per size and round")
    parser.add_argument("--photos", type=Path, action="append", default=[], help="folder of real photos (repeatable)")
    parser.add_argument("--modes", nargs="+", default=["speed", "workers", "quality", "screen", "filters", "decoders"],
                        choices=["speed", "workers", "quality", "screen", "filters", "decoders"])
    parser.add_argument("--worker", nargs=2, metavar=("CONTENDER", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker[0], Path(args.worker[1]))
        return
    cv2.setNumThreads(1)  # img2dataset's Resizer sets the same for itself
    photos = load_photos(args.photos)
    all_sets = {size: sets_for(*size, args.images, photos) for size in SIZES}
    print(f"{len(photos)} real photos; load average {os.getloadavg()[0]:.1f}")
    if "speed" in args.modes:
        speed(all_sets, args.rounds)
    if "workers" in args.modes:
        workers(all_sets, args.rounds)
    if "quality" in args.modes:
        quality(all_sets)
    if "screen" in args.modes:
        screen_cost(all_sets[(640, 480)]["texture"], args.rounds)
    if "filters" in args.modes:
        filters(all_sets, args.rounds)
    if "decoders" in args.modes:
        decoders(all_sets, args.rounds)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
