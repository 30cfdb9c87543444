"""Choose the pHash Hamming threshold of evaluation-image decontamination on measured near-duplicates.

For every image of the given sets (folders, zips, tars: e.g. the sample photos in scikit-image's wheel,
`skimage/data/*.png|jpg`, and matplotlib's `grace_hopper.jpg`): the pHash distance between the original and copies made
the ways a corpus copy differs from an evaluation image (the build's own resize + JPEG, other sizes, strong JPEG,
border crops, combinations), and the distance between every two different images. Prints the distributions and,
per threshold, the share of copies caught and of different-image pairs wrongly matched.

Run: pip download --no-deps scikit-image==0.26.0 -d /tmp/ski && mkdir /tmp/ski/data && \
     unzip -j /tmp/ski/scikit_image-*.whl 'skimage/data/*.png' 'skimage/data/*.jpg' -d /tmp/ski/data && \
     python benchmarks/eval_overlap_threshold.py --images /tmp/ski/data \
         --images "$(python -c 'import matplotlib, os; print(os.path.join(matplotlib.get_data_path(),
         "sample_data", "grace_hopper.jpg"))')"
"""

from __future__ import annotations

import argparse
import io
import itertools
import statistics
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

from pmd.decontaminate import IMAGE_SUFFIXES, hamming, iter_images, phash, phash_bytes
from pmd.images import ImageOptions, process_image

THRESHOLDS = (4, 6, 8, 10, 12, 14, 16, 18, 20)
MIN_SIDE = 128  # smaller sample images (icons, 25 px faces) say nothing about photos


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def _scale(image: Image.Image, factor: float) -> Image.Image:
    w, h = image.size
    return image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.LANCZOS)


def _crop(image: Image.Image, fraction: float) -> Image.Image:
    """Cut `fraction` of the width and of the height, split over both sides (a centred crop)."""
    w, h = image.size
    dx, dy = round(w * fraction / 2), round(h * fraction / 2)
    return image.crop((dx, dy, w - dx, h - dy))


def _build_copy(data: bytes) -> Image.Image:
    """What the corpus stores: pmd's own image processing (shorter side 256, JPEG 95)."""
    return Image.open(io.BytesIO(process_image(data, ImageOptions()).data))


TRANSFORMS: dict[str, Callable[[Image.Image, bytes], Image.Image]] = {
    "build copy (256 px, JPEG 95)": lambda im, data: _build_copy(data),
    "resize 50%": lambda im, data: _scale(im, 0.5),
    "resize 25%": lambda im, data: _scale(im, 0.25),
    "JPEG 30": lambda im, data: _jpeg(im, 30),
    "JPEG 10": lambda im, data: _jpeg(im, 10),
    "crop 5%": lambda im, data: _crop(im, 0.05),
    "crop 10%": lambda im, data: _crop(im, 0.10),
    "crop 20%": lambda im, data: _crop(im, 0.20),
    "crop 10% + 50% + JPEG 75": lambda im, data: _jpeg(_scale(_crop(im, 0.10), 0.5), 75),
    "mirrored (not a copy)": lambda im, data: ImageOps.mirror(im),
}


def load(paths: list[Path]) -> list[tuple[str, bytes, Image.Image]]:
    images = []
    for path in paths:
        members = iter_images(path) if path.suffix.lower() not in IMAGE_SUFFIXES else [(path.name, path.read_bytes())]
        for name, data in members:
            image = Image.open(io.BytesIO(data))
            image.load()
            if min(image.size) >= MIN_SIDE:
                images.append((name, data, image))
    return images


def summary(values: list[int]) -> str:
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return (f"n={len(values)} min={min(values)} p1={q[0]:.0f} p5={q[4]:.0f} median={statistics.median(values):.0f} "
            f"p95={q[94]:.0f} max={max(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", action="append", type=Path, required=True,
                        help="a folder, zip (a wheel is a zip), tar or single image; repeatable")
    args = parser.parse_args()
    images = load(args.images)
    originals = {name: phash_bytes(data) for name, data, _ in images}
    print(f"{len(images)} images of at least {MIN_SIDE} px")
    copies: dict[str, list[int]] = {}
    for label, make in TRANSFORMS.items():
        copies[label] = [hamming(originals[name], phash(make(image, data))) for name, data, image in images]
        print(f"  {label:28s} {summary(copies[label])}")
    different = [(hamming(originals[a], originals[b]), a, b) for a, b in itertools.combinations(originals, 2)]
    print(f"  {'different images':28s} {summary([d for d, _, _ in different])}")
    print("  closest different pairs: " + ", ".join(f"{a} / {b} = {d}" for d, a, b in sorted(different)[:5]))
    print()
    print("threshold | copies caught (all but mirrored) | different pairs matched")
    genuine = [d for label, ds in copies.items() if not label.startswith("mirrored") for d in ds]
    for t in THRESHOLDS:
        caught = sum(d <= t for d in genuine)
        wrong = sum(d <= t for d, _, _ in different)
        print(f"{t:9d} | {caught}/{len(genuine)} ({caught / len(genuine):.1%}) | {wrong}/{len(different)}")


if __name__ == "__main__":
    main()
