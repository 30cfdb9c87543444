"""Decode, check, crop, resize and re-encode one image: the per-image work of the build stage.

Every image is decoded exactly once with Pillow, from its bytes in memory. The order is chosen so that rejects cost
as little as possible and the output is a pure function of (input bytes, options, crop box):

1. ``Image.open`` reads the header only. The pixel count is checked there (the decompression-bomb guard), and when
   there is no crop box so are the shorter side and the aspect ratio: all three are invariant under EXIF rotation,
   so an image that fails them is rejected before any pixel is decoded.
2. A JPEG much larger than the target is decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``: libjpeg's DCT scaling,
   deterministic for a given libjpeg build). Only without a crop box, whose coordinates are in full-size pixels.
3. ``load()`` with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off, so a truncated file is a ``decode_error`` rather than an
   image padded with grey.
4. EXIF orientation is applied (in place), the crop box (x, y, w, h, in the coordinates of the upright image) is
   clamped and applied, and the checks run on the cropped size.
5. Conversion to RGB (alpha composited onto white), resize so the shorter side is ``image_size`` (never upscale),
   JPEG encode without EXIF or ICC data.

Throughput (one core of this repo's shared 2-core dev machine, Pillow 13.0 with libjpeg-turbo, a 640x480 q90
photo-like JPEG of ~150 KB to 341x256 q95): about 220 images/s, ~4.5 ms each (~2.0 ms decode, ~2 ms BICUBIC
resize, ~0.3 ms encode); LANCZOS measured ~185 images/s. A 4000x3000 JPEG (2 MB) takes ~32 ms with the 1/4-scale
draft decode instead of ~83 ms without. ``benchmarks/bench_images.py`` measures this path beside img2dataset's
resizer (docs/benchmarks.md).

Colour management is not applied: ICC profiles are dropped and CMYK is converted by Pillow's formula, as
img2dataset (OpenCV) does too.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO

from PIL import ExifTags, Image, ImageFile, ImageOps

from pmd.reasons import Reason

# Formats we accept. Restricting Image.open keeps exotic decoders (EPS shells out to Ghostscript; PSD, FITS, ...)
# away from untrusted bytes downloaded from the web; every upstream PMD source serves one of these.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

# BICUBIC rather than LANCZOS: both are antialiased convolutions in Pillow when downscaling, LANCZOS is ~20% slower
# end to end (measured: 183 vs 220 images/s, 640x480 -> 256) for a difference invisible at training resolution.
# reducing_gap=3.0: a box reduction first for large downscales, which per Pillow's docs is indistinguishable from
# a full resample in most cases, at a fraction of the cost.
_RESAMPLE = Image.Resampling.BICUBIC
_REDUCING_GAP = 3.0
# Draft (DCT-scaled JPEG decode) keeps at least this many times the target size, so the resize pass still has
# real pixels to average (the same margin Image.thumbnail uses).
_DRAFT_GAP = 2

REASONS: tuple[Reason, ...] = (Reason.DECODE_ERROR, Reason.TOO_SMALL, Reason.ASPECT_RATIO, Reason.TOO_MANY_PIXELS,
                               Reason.BAD_BOX, Reason.TOO_LARGE)

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 256  # shorter side after resize, keeping aspect ratio; 0 = keep as is; never upscale
    jpeg_quality: int = 95
    min_side: int = 32  # shorter side (after crop, before resize) below this -> "too_small"
    max_aspect_ratio: float = 6.0  # max(w, h) / min(w, h) above this -> "aspect_ratio"
    max_pixels: int = 89_478_485  # w * h (header size) above this -> "too_many_pixels"; Pillow's own default
    # Encoded bytes of one image (a download body or an archive member) above this -> "too_large", checked before
    # the bytes are held: PMD's images are a few hundred KB, a 32 MiB cap keeps hostile bodies out of memory.
    max_image_bytes: int = 32 * 1024**2

    def __post_init__(self) -> None:
        for name in ("image_size", "jpeg_quality", "min_side", "max_pixels", "max_image_bytes"):
            value = getattr(self, name)
            # bool is an int subclass; True as a size is always a mistake.
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"ImageOptions.{name} must be an int, got {value!r}")
        if self.image_size < 0:
            raise ValueError(f"ImageOptions.image_size must be >= 0 (0 = keep size), got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"ImageOptions.jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.min_side < 0:
            raise ValueError(f"ImageOptions.min_side must be >= 0, got {self.min_side}")
        if self.max_image_bytes < 1:
            raise ValueError(f"ImageOptions.max_image_bytes must be positive, got {self.max_image_bytes}")
        if self.max_pixels < 0:
            raise ValueError(f"ImageOptions.max_pixels must be >= 0, got {self.max_pixels}")
        if not isinstance(self.max_aspect_ratio, (int, float)) or isinstance(self.max_aspect_ratio, bool):
            raise ValueError(f"ImageOptions.max_aspect_ratio must be a number, got {self.max_aspect_ratio!r}")
        if not self.max_aspect_ratio >= 1.0:  # also rejects NaN
            raise ValueError(f"ImageOptions.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes  # JPEG bytes
    sha256: str  # hex sha256 of data
    width: int  # stored size
    height: int
    original_width: int  # as decoded: upright (EXIF orientation applied), after the crop if any, full resolution
    original_height: int


class ImageRejected(Exception):
    """An image that does not become a shard row. ``reason`` is short and stable (see REASONS), ``detail`` free."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable with both arguments (Ray ships exceptions between processes)
        return (type(self), (self.reason, self.detail))


_truncated_lock = threading.Lock()


@contextmanager
def _no_truncated_images() -> Iterator[None]:
    """Decode with LOAD_TRUNCATED_IMAGES off, restoring whatever the process had set.

    In the normal case the flag is already False and nothing is written, so concurrent decodes in threads do not
    interfere. Only if some other code turned it on is it switched off for the decode (under a lock) and back.
    """
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _truncated_lock:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _check_size(width: int, height: int, options: ImageOptions) -> None:
    # Aspect ratio first: a 10000x10 banner is rejected as a banner, not as small.
    short, long = min(width, height), max(width, height)
    if long > options.max_aspect_ratio * max(short, 1):
        ratio = long / max(short, 1)
        raise ImageRejected(Reason.ASPECT_RATIO, f"{width}x{height}, ratio {ratio:.2f} > {options.max_aspect_ratio}")
    if short < max(options.min_side, 1):
        raise ImageRejected(Reason.TOO_SMALL, f"{width}x{height}, shorter side < {options.min_side}")


def _target_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """Shorter side -> image_size, longer side scaled and rounded half up (integer arithmetic: no float drift)."""
    if width <= height:
        return image_size, max(1, (height * image_size * 2 + width) // (2 * width))
    return max(1, (width * image_size * 2 + height) // (2 * height)), image_size


def _clamp_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(round(v)) for v in box)
    except (TypeError, ValueError) as e:
        raise ImageRejected(Reason.BAD_BOX, f"{box!r}: {e}") from None
    left, top = max(0, x), max(0, y)
    right, bottom = min(width, x + w), min(height, y + h)
    if right <= left or bottom <= top:
        raise ImageRejected(Reason.BAD_BOX, f"box {box!r} is empty inside the {width}x{height} image")
    return left, top, right, bottom


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB without copying when it already is; transparency composited onto white."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" not in im.info:
        return im.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode == "F":
        return im.convert("L").convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit greyscale (PNG): scale to 8 bits instead of letting convert() clip everything above 255 to white.
        return im.convert("I").point(lambda v: v * (1 / 256)).convert("L").convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, F


def process_image(
    raw: bytes,
    options: ImageOptions,
    crop_box: tuple[int, int, int, int] | None = None,
) -> ProcessedImage:
    """Decode ``raw``, check it, optionally crop ``(x, y, w, h)``, resize and re-encode as JPEG.

    Raises ImageRejected (reason in REASONS) for anything that must not become a shard row; any other exception
    is a bug. The output bytes are identical for identical (raw, options, crop_box) with the same Pillow/libjpeg.
    """
    try:
        with _no_truncated_images():
            # Not closed explicitly: the source is an in-memory buffer, and the decoded image may be returned as is.
            im = Image.open(BytesIO(raw), formats=ALLOWED_FORMATS)
            rgb, original = _decode(im, options, crop_box)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own guard (MAX_IMAGE_PIXELS) fired in Image.open; the warning arrives as an exception only when
        # warnings are errors (e.g. under pytest -W error). Either way the header claimed too many pixels.
        raise ImageRejected(Reason.TOO_MANY_PIXELS, str(e)) from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure on untrusted bytes is that image's decode_error
        raise ImageRejected(Reason.DECODE_ERROR, f"{type(e).__name__}: {e}") from None

    if options.image_size and min(original) > options.image_size:
        target = _target_size(original[0], original[1], options.image_size)
        if rgb.size != target:
            rgb = rgb.resize(target, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    out = BytesIO()
    rgb.save(out, format="JPEG", quality=options.jpeg_quality, optimize=False)
    data = out.getvalue()
    return ProcessedImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        width=rgb.size[0],
        height=rgb.size[1],
        original_width=original[0],
        original_height=original[1],
    )


def _decode(
    im: ImageFile.ImageFile, options: ImageOptions, crop_box: tuple[int, int, int, int] | None
) -> tuple[Image.Image, tuple[int, int]]:
    """The opened image as upright RGB (cropped, possibly DCT-downscaled) and its upright full-resolution size."""
    full_width, full_height = im.size
    if full_width * full_height > options.max_pixels:
        raise ImageRejected(Reason.TOO_MANY_PIXELS, f"{full_width}x{full_height} > {options.max_pixels} pixels")
    if crop_box is None:
        _check_size(full_width, full_height, options)
        # Draft only when the image will be resized anyway and stays >= _DRAFT_GAP x the target after scaling.
        if im.format in ("JPEG", "MPO") and options.image_size:
            if min(full_width, full_height) >= 2 * _DRAFT_GAP * options.image_size:
                side = _DRAFT_GAP * options.image_size
                im.draft(None, (side, side))

    im.load()
    # Read before exif_transpose, which deletes the tag; getexif() is cached, so this parses the EXIF block once.
    orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    ImageOps.exif_transpose(im, in_place=True)
    if crop_box is None:
        # The header size is pre-rotation; orientations 5-8 swap the axes.
        original = (full_height, full_width) if orientation in (5, 6, 7, 8) else (full_width, full_height)
        return _to_rgb(im), original
    # Crop before the RGB conversion so only the kept region is converted.
    cropped = im.crop(_clamp_box(crop_box, im.size[0], im.size[1]))
    _check_size(cropped.size[0], cropped.size[1], options)
    return _to_rgb(cropped), cropped.size
