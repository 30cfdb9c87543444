"""The one synthetic-image generator: coloured shapes on light backgrounds, described by their captions.

The demo's corpus, the trainer's test shards, the build fixtures and the loopback server all draw here, so a
change in how test images look is made once. `numbered_jpeg` gives images whose bytes differ for every n (a
stamp of n's bits), for tests that count unique images or compare bodies.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (240, 210, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("a {c} {s}", "a photo of a {c} {s}", "a {c} {s} on a plain background", "there is a {c} {s} here",
             "a simple drawing of a {c} {s}", "the {s} is {c}")
STAMP_BITS = 24  # numbered_jpeg tells apart n < 2**24
_STAMP = (0, 0, 0)  # black: far from every background (200-255), so JPEG quantisation keeps each stamp pixel


@dataclass(frozen=True)
class Drawing:
    colour: str
    shape: str
    seed: int

    def caption(self, variant: int = 0) -> str:
        return TEMPLATES[variant % len(TEMPLATES)].format(c=self.colour, s=self.shape)

    @classmethod
    def numbered(cls, n: int) -> Drawing:
        """The n-th drawing: colours and shapes in turn, the rest from n."""
        colours = list(COLOURS)
        return cls(colours[n % len(colours)], SHAPES[(n // len(colours)) % len(SHAPES)], n)


def draw(d: Drawing, size: int | tuple[int, int] = 96, stamp: int | None = None) -> Image.Image:
    """The image a caption describes: one shape, random place and size, light random background.

    `size` is a side or (width, height). `stamp`: its low STAMP_BITS bits set as black pixels along the top rows,
    so that two stamps never give the same pixels.
    """
    width, height = (size, size) if isinstance(size, int) else size
    rng = random.Random(d.seed)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (width, height), background)
    pen = ImageDraw.Draw(img)
    side = min(width, height)
    r = rng.randint(side // 5, side // 3)
    cx, cy = rng.randint(r, width - r), rng.randint(r, height - r)
    colour = COLOURS[d.colour]
    if d.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif d.shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    if stamp is not None:
        for bit in range(STAMP_BITS):
            if stamp >> bit & 1:
                img.putpixel((bit % width, (bit // width) % height), _STAMP)
    return img


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@lru_cache(maxsize=None)
def numbered_jpeg(n: int, width: int, height: int) -> bytes:
    """A deterministic JPEG for n: the n-th drawing stamped with n, so different n give different sha256."""
    return jpeg(draw(Drawing.numbered(n), (width, height), stamp=n))
