"""Decode, check, crop, resize and re-encode one image: the per-image work of the build stage.

Every image is decoded exactly once, from its bytes in memory: a JPEG (RGB or greyscale) with simplejpeg
(libjpeg-turbo) straight into a numpy array, anything else (and a JPEG with a crop box) with Pillow. The order is
chosen so that rejects cost as little as possible and the output is a pure function of (input bytes, options, crop
box):

1. ``Image.open`` reads the header only. The pixel count is checked there (the decompression-bomb guard), and when
   there is no crop box so are the shorter side and the aspect ratio: all three are invariant under EXIF rotation,
   so an image that fails them is rejected before any pixel is decoded.
2. A JPEG at least 6x the target is decoded at 1/2, 1/4 or 1/8 scale (libjpeg-turbo's DCT scaling), the smallest
   scale that keeps the shorter side >= 3x the target (the quality margin, ``_DRAFT_MARGIN``). Only without a crop
   box, whose coordinates are in full-size pixels.
3. Strict decoding: Pillow's ``load()`` with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off, so a truncated file is a
   ``decode_error`` rather than an image padded with grey. simplejpeg runs with ``strict=True`` and hands whatever
   libjpeg warns about to Pillow, which decides as before.
4. Without a crop box: the pixels (BGR, alpha composited onto white), one antialiased resize so the shorter side
   is ``image_size`` (``_antialiased``; never upscale), then the EXIF orientation, on the small array. With a crop
   box (x, y, w, h, in the coordinates of the upright image): orientation, clamp and crop, the checks on the
   cropped size, RGB, resize.
5. JPEG encode (OpenCV's, the bytes Pillow's gave) without EXIF or ICC data; optionally the pHash of the stored
   pixels (``with_phash``: the evaluation-image screen of pmd.decontaminate, so nothing is decoded a second time).

Why this decoder and filter (measured, docs/benchmarks.md "One image at the decoder's limit",
benchmarks/bench_images.py): libjpeg-turbo can also scale by 3/8, 5/8, 6/8 and 7/8 (simplejpeg, PyTurboJPEG), but
on x86-64 those IDCTs have no SIMD path: they decode no faster than the power-of-two scale above them (often slower)
and, like every DCT scaling that ends near the target, lose several dB PSNR on real photos. pyvips' shrink-on-load
was slower than Pillow here, and OpenCV's IMREAD_REDUCED_* gives the same scales as ``draft``. The resize: one
INTER_AREA (img2dataset's filter) at a non-integer ratio is OpenCV's scalar general path and cost more than the
decode; ``_antialiased`` reaches the same geometry in SIMD steps at about half the time, with PSNR to a full decode
+ LANCZOS higher on real photos and within 0.2 dB on generated texture. All steps are integer arithmetic on uint8,
so the output is deterministic.

The large arrays (the decoded pixels, each resize step) are written into kept buffers (``_Scratch``, one set per
call in flight, from a pool bounded in bytes), not freshly allocated. glibc gives a freed block of more than 128 KiB
back to the kernel (an unmapped chunk, or a trimmed heap top), and the next image's block comes back as new zeroed
pages. In a download worker that cost ~510 page faults and 1.1 ms of a 640x480 image's 2.3 ms (measured); with the
buffers kept there are none. A process that has once freed a very large block (Pillow's 16 MiB image blocks) has
glibc's thresholds raised and never shows it, so one-process timings of the image alone did not.

Colour management is not applied: ICC profiles are dropped and CMYK is converted by Pillow's formula, as
img2dataset (OpenCV) does too.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO

import cv2
import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageFile

from pmd.reasons import Reason

# Formats we accept. Restricting Image.open keeps exotic decoders (EPS shells out to Ghostscript; PSD, FITS, ...)
# away from untrusted bytes downloaded from the web; every upstream PMD source serves one of these.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

# One thread per resize: the build already runs one image stream per core, and OpenCV's own pool would only contend.
cv2.setNumThreads(1)
# Draft (DCT-scaled JPEG decode) keeps the shorter side >= this many times the target. DCT scaling lowpasses each
# 8x8 block on its own, and real photos show it (block edges, ringing): measured against full decode + LANCZOS, on
# real photos a 1/4-scale decode just above the target lost 5.7 dB PSNR (1400x1050 -> 350x263), one at 1.5x the
# target 0.6 dB; at >= 3x (here: 1/2 of 2048x1536, 1/2 of 4000x3000, none for 1400x1050) 0.04-0.11 dB, against
# img2dataset's full decode + INTER_AREA (benchmarks/bench_images.py --modes quality; docs/benchmarks.md).
_DRAFT_MARGIN = 3
# EXIF orientation -> the transpose that shows the image upright (as PIL.ImageOps.exif_transpose maps them).
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

REASONS: tuple[Reason, ...] = (Reason.DECODE_ERROR, Reason.TOO_SMALL, Reason.ASPECT_RATIO, Reason.TOO_MANY_PIXELS,
                               Reason.BAD_BOX, Reason.TOO_LARGE)

# The same transposes on an (h, w, 3) array, checked against Pillow's in tests/pmd/test_images.py.
_ORIENT_ARRAY = {
    Image.Transpose.FLIP_LEFT_RIGHT: lambda a: a[:, ::-1],
    Image.Transpose.ROTATE_180: lambda a: a[::-1, ::-1],
    Image.Transpose.FLIP_TOP_BOTTOM: lambda a: a[::-1],
    Image.Transpose.TRANSPOSE: lambda a: a.transpose(1, 0, 2),
    Image.Transpose.ROTATE_270: lambda a: np.rot90(a, -1),
    Image.Transpose.TRANSVERSE: lambda a: np.rot90(a, -1)[::-1],
    Image.Transpose.ROTATE_90: lambda a: np.rot90(a, 1),
}
_SWAPS = frozenset({Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                    Image.Transpose.ROTATE_90})
_WHITE = (255, 255, 255)
# A scratch buffer kept for the next image is at most this size: the decode of any 4:3 image at the draft margin
# (at most ~9.4 MB: a shorter side just under 2x the margin, 1535x2046, with room to grow); a larger one (a very
# long image) is allocated for that image alone. A 640x480 image's buffers are 2.2 MB together.
_SCRATCH_KEEP_BYTES = 16 * 1024**2
# What the idle pool may hold in all, whatever the number of download threads: a buffer set that would pass it is
# dropped when its call ends (the next call allocates again, and pays the page faults).
_SCRATCH_POOL_BYTES = 128 * 1024**2
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
    phash: int | None = None  # pmd.decontaminate's 64-bit pHash of the stored pixels, when asked for


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
    *,
    with_phash: bool = False,
) -> ProcessedImage:
    """Decode ``raw``, check it, optionally crop ``(x, y, w, h)``, resize and re-encode as JPEG.

    Raises ImageRejected (reason in REASONS) for anything that must not become a shard row; any other exception
    is a bug. The output bytes are identical for identical (raw, options, crop_box) with the same Pillow/libjpeg
    and OpenCV. ``with_phash``: also the pHash of the stored image, from the pixels before encoding (within a
    Hamming distance of 2 of the hash of the decoded JPEG, tests/pmd/test_decontaminate.py).
    """
    with _scratch() as scratch:
        return _process_image(raw, options, crop_box, with_phash, scratch)


def _process_image(raw: bytes, options: ImageOptions, crop_box: tuple[int, int, int, int] | None, with_phash: bool,
                   scratch: _Scratch) -> ProcessedImage:
    try:
        with _no_truncated_images():
            # Not closed explicitly: the source is an in-memory buffer, and the decoded image may be returned as is.
            im = Image.open(BytesIO(raw), formats=ALLOWED_FORMATS)
            bgr, original = _decode(im, raw, options, crop_box, scratch)
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

    # OpenCV's encoder takes the array as it is (BGR, contiguous): no Image.fromarray copy, ~0.1 ms less than
    # Pillow's save, and the same bytes (both call libjpeg-turbo with its defaults: 4:2:0, baseline, not optimised,
    # no EXIF or ICC; tests/pmd/test_images.py). simplejpeg's encoder was as fast but 0.3 dB PSNR lower.
    ok, encoded = cv2.imencode(".jpg", bgr, (cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {bgr.shape} image")  # a bug: every checked image encodes
    data = encoded.tobytes()
    value = None
    if with_phash:
        from pmd.decontaminate import phash_pixels  # lazily: pmd.decontaminate pulls in pyarrow and the archives

        value = phash_pixels(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))  # a contiguous copy: fast
    return ProcessedImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        width=bgr.shape[1],
        height=bgr.shape[0],
        original_width=original[0],
        original_height=original[1],
        phash=value,
    )


class _Scratch:
    """Reusable uint8 buffers, by role (the decode, each resize step), for one process_image call at a time
    (``_scratch``). An array from ``array(role, shape)`` is valid until that role is asked for again: process_image
    encodes (and hashes) its output before it returns, and nothing it returns is a view of a buffer."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def array(self, role: str, shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)
        buffer = self.buffers.get(role)
        if buffer is None or buffer.size < size:
            # Room for a somewhat larger image than this one: sizes vary image to image, and a buffer that grew by
            # each new maximum would be a new block (new pages) for every few images.
            buffer = np.empty(min(size + size // 2, max(size, _SCRATCH_KEEP_BYTES)), np.uint8)
            if size <= _SCRATCH_KEEP_BYTES:
                self.buffers[role] = buffer
        return buffer[:size].reshape(shape)


_SCRATCH_POOL: list[tuple[_Scratch, int]] = []  # idle sets, each with its size when it was put back
_SCRATCH_LOCK = threading.Lock()
_pooled_bytes = 0  # the sum of those sizes


@contextmanager
def _scratch() -> Iterator[_Scratch]:
    """A scratch set no other call uses meanwhile, kept for the next call (the download threads of a chunk end with
    it, the pool does not) while the idle pool stays within _SCRATCH_POOL_BYTES."""
    global _pooled_bytes
    with _SCRATCH_LOCK:
        if _SCRATCH_POOL:
            scratch, size = _SCRATCH_POOL.pop()
            _pooled_bytes -= size
        else:
            scratch = _Scratch()
    try:
        yield scratch
    finally:
        size = scratch.nbytes
        with _SCRATCH_LOCK:
            if _pooled_bytes + size <= _SCRATCH_POOL_BYTES:
                _SCRATCH_POOL.append((scratch, size))
                _pooled_bytes += size


def _resize(rgb: Image.Image, width: int, height: int, options: ImageOptions, scratch: _Scratch) -> np.ndarray:
    """Shorter side of the full-resolution ``width`` x ``height`` -> ``image_size``, as a BGR array (the channel
    order of the JPEG path and of OpenCV's encoder), swapped on the small image."""
    return cv2.cvtColor(_resize_array(np.asarray(rgb), width, height, options, scratch), cv2.COLOR_RGB2BGR)


def _resize_array(pixels: np.ndarray, width: int, height: int, options: ImageOptions,
                  scratch: _Scratch) -> np.ndarray:
    """The same on an array that may be DCT-scaled: one antialiased resize (`_antialiased`), never up."""
    if not options.image_size or min(width, height) <= options.image_size:
        return pixels
    target = _target_size(width, height, options.image_size)
    if (pixels.shape[1], pixels.shape[0]) == target:
        return pixels
    return _antialiased(pixels, target, scratch)


def _antialiased(pixels: np.ndarray, target: tuple[int, int], scratch: _Scratch | None = None) -> np.ndarray:
    """Downscale to ``target`` (w, h) in exact steps: INTER_AREA halvings while the image stays >= 2x the target
    (a 2x2 mean, OpenCV's SIMD fast path), a bicubic resample to exactly 2x the target, and a last 2x2 mean.

    Why not one INTER_AREA, img2dataset's filter: at a non-integer ratio OpenCV runs its scalar general area path,
    1.2-2.4 ms for 500x375-1024x768 to 341x256, more than the decode; these steps cost 0.55-0.9 ms (measured,
    docs/benchmarks.md). Quality against full decode + LANCZOS: higher than INTER_AREA on real photos (the bicubic
    step keeps edges INTER_AREA's box blurs), within 0.2 dB below it on the generated texture set. Every step maps
    the whole image onto the whole target (no crop, no pad), so nothing shifts by a fraction of a pixel; an odd
    side that would need halving falls back to the single INTER_AREA. All three filters run in fixed-point integer
    arithmetic on uint8: the same bytes for the same input and OpenCV. (The integer 2x2 mean rounds halves up:
    outputs are 0.15-0.4 of a level brighter than INTER_AREA's on average, tests/pmd/test_images.py.)
    """
    width, height = target
    double = (2 * width, 2 * height)

    def into(role: str, size: tuple[int, int]) -> np.ndarray | None:  # where a step writes (None: a new array)
        return None if scratch is None else scratch.array(role, (size[1], size[0], *pixels.shape[2:]))

    halvings = 0
    while pixels.shape[1] >= double[0] and pixels.shape[0] >= double[1] and pixels.shape[1::-1] != double:
        if pixels.shape[1] % 2 or pixels.shape[0] % 2:
            return cv2.resize(pixels, target, dst=into("out", target), interpolation=cv2.INTER_AREA)
        half = (pixels.shape[1] // 2, pixels.shape[0] // 2)
        # Two buffers taken in turn: a step never writes the array it reads.
        pixels = cv2.resize(pixels, half, dst=into(f"half{halvings % 2}", half), interpolation=cv2.INTER_AREA)
        halvings += 1
    if pixels.shape[1::-1] != double:  # now under 2x the target: an upscale, which bicubic interpolates cleanly
        pixels = cv2.resize(pixels, double, dst=into("double", double), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(pixels, target, dst=into("out", target), interpolation=cv2.INTER_AREA)


def _draft_scale(width: int, height: int, options: ImageOptions) -> int:
    """The DCT scale denominator (1, 2, 4, 8) of a JPEG: the largest that keeps the shorter side >= _DRAFT_MARGIN x
    the target. Powers of two only: libjpeg-turbo's other M/8 scales have no SIMD IDCT (measured slower)."""
    short = min(width, height)
    need = _DRAFT_MARGIN * options.image_size
    if not options.image_size or short <= options.image_size:
        return 1
    return next((s for s in (8, 4, 2) if -(-short // s) >= need), 1)


def _decode_jpeg(raw: bytes, width: int, height: int, options: ImageOptions, scratch: _Scratch) -> np.ndarray | None:
    """simplejpeg (libjpeg-turbo) decodes straight into the BGR array the resize reads (Pillow's RGBX copy to
    numpy cost ~1 ms at 1024x768). Strict, so that anything libjpeg warns about (a truncated stream, but also the
    extraneous bytes before a marker that many web JPEGs carry) returns None: Pillow then decides as it always did
    (truncated: decode_error; extraneous bytes: decoded). CMYK and other JPEGs never come here."""
    scale = _draft_scale(width, height, options)
    axis = "min_height" if height <= width else "min_width"
    at_least = {} if scale == 1 else {axis: -(-min(width, height) // scale)}
    # libjpeg's scaled size is the full size / scale, rounded up.
    buffer = scratch.array("decode", (-(-height // scale), -(-width // scale), 3))
    try:
        # fastupsample: chroma replicated instead of libjpeg's triangle filter (the merged SIMD upsampler, ~6%
        # faster); the antialiased resize that follows makes the filter moot (PSNR equal or higher, measured).
        return simplejpeg.decode_jpeg(raw, "BGR", fastupsample=True, strict=True, buffer=buffer, **at_least)
    except ValueError:
        return None


def _decode(
    im: ImageFile.ImageFile, raw: bytes, options: ImageOptions, crop_box: tuple[int, int, int, int] | None,
    scratch: _Scratch,
) -> tuple[np.ndarray, tuple[int, int]]:
    """The opened image as upright, resized pixels (cropped first if asked; a C-contiguous uint8 BGR array) and its
    upright full-resolution size."""
    full_width, full_height = im.size
    if full_width * full_height > options.max_pixels:
        raise ImageRejected(Reason.TOO_MANY_PIXELS, f"{full_width}x{full_height} > {options.max_pixels} pixels")
    # getexif() is cached and reads the header's EXIF block: no pixel is decoded for it.
    method = _ORIENT.get(im.getexif().get(ExifTags.Base.Orientation, 1))
    if crop_box is None:
        _check_size(full_width, full_height, options)
        pixels = _decode_jpeg(raw, full_width, full_height, options, scratch) if im.format in ("JPEG", "MPO") and \
            im.mode in ("RGB", "L") else None
        if pixels is not None:
            bgr = _resize_array(pixels, full_width, full_height, options, scratch)
        else:
            scale = _draft_scale(full_width, full_height, options) if im.format in ("JPEG", "MPO") else 1
            if scale > 1:  # the same DCT scale as simplejpeg's (Pillow picks the largest power of two that fits)
                im.draft(None, (full_width // scale, full_height // scale))
            im.load()
            bgr = _resize(_to_rgb(im), full_width, full_height, options, scratch)
        # Resized in the stored axes (the target keeps the aspect ratio, which a rotation only swaps), then rotated:
        # the small image rather than the decoded one.
        if method is None:
            return bgr, (full_width, full_height)
        # Orientations 5-8 swap the axes.
        return (np.ascontiguousarray(_ORIENT_ARRAY[method](bgr)),
                (full_height, full_width) if method in _SWAPS else (full_width, full_height))
    im.load()
    upright = im if method is None else im.transpose(method)
    # Crop before the RGB conversion so only the kept region is converted.
    cropped = upright.crop(_clamp_box(crop_box, upright.size[0], upright.size[1]))
    _check_size(cropped.size[0], cropped.size[1], options)
    return _resize(_to_rgb(cropped), cropped.size[0], cropped.size[1], options, scratch), cropped.size
