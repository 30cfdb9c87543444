"""One image's work, `pmd.images.process_image`, beside img2dataset's Resizer doing the same job.

Both take the same JPEG bytes and return a JPEG whose shorter side is 256 px (aspect kept, quality 95): ours with
Pillow (JPEG draft decoding, then a resize), img2dataset with OpenCV (decode, INTER_AREA, encode). The photos are
generated (smooth gradients plus seeded noise, so that JPEG sizes are photo-like) at a few typical PMD sizes. Rounds
alternate between the two, one process, one core; the figure is the median round's images per second.
(Formerly a wall-clock assertion in tests/pmd/test_images.py.)
Run: python benchmarks/bench_images.py [--rounds 7] [--images 40]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image

from pmd.images import ImageOptions, process_image

SIZES = ((640, 480), (500, 375), (1024, 768), (2048, 1536))


def photo(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=2)
    coarse = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = 0.5 * base + 0.5 * coarse + rng.normal(0, 6, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def ours(images: list[bytes]) -> None:
    options = ImageOptions(image_size=256, jpeg_quality=95)
    for data in images:
        process_image(data, options)


def img2dataset_resizer():
    from img2dataset.resizer import Resizer

    resizer = Resizer(image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_quality=95)

    def run(images: list[bytes]) -> None:
        for data in images:
            _, _, _, _, _, error = resizer(io.BytesIO(data))
            assert error is None, error

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=40, help="images per size and round")
    args = parser.parse_args()
    peer = img2dataset_resizer()
    print(f"{'size':>10} | {'pmd img/s':>9} | {'img2dataset img/s':>17} | ratio")
    for width, height in SIZES:
        images = [photo(width, height, seed) for seed in range(args.images)]
        ours(images[:2]), peer(images[:2])  # warm both (imports, codec tables)
        rates: dict[str, list[float]] = {"pmd": [], "img2dataset": []}
        for _ in range(args.rounds):
            for name, fn in (("pmd", ours), ("img2dataset", peer)):
                start = time.perf_counter()
                fn(images)
                rates[name].append(len(images) / (time.perf_counter() - start))
        a, b = statistics.median(rates["pmd"]), statistics.median(rates["img2dataset"])
        print(f"{width:>5}x{height:<4} | {a:9.0f} | {b:17.0f} | {a / b:.2f}", flush=True)


if __name__ == "__main__":
    main()
