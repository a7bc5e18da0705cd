"""A trained third-party model and realistic shifts, built offline, for bench/adaptation.py.

**Model.** PaddleOCR's text-direction classifier `ch_ppocr_mobile_v2.0_cls_infer.onnx`
(MobileNetV3-small, 35 BatchNormalization nodes, classes '0' and '180'), as the PyPI wheel
`rapidocr_onnxruntime` 1.4.4 ships it (Apache-2.0). `fetch_model()` downloads the wheel with
`pip download --no-deps` into the git-ignored bench/.cache/ and unpacks the one .onnx file; the
weights are never committed.

**Data.** Text lines rendered with PIL in the DejaVu fonts (Debian's fonts-dejavu-core; PIL's
own default font where they are missing): random words of letters and digits, dark ink on a
light page, random size, ink, page tone and margins. Each line appears upright (label 0) and
rotated by 180 degrees (label 1). Preprocessing is the package's own
(`TextClassifier.resize_norm_img`): resize to height 48 keeping the aspect ratio (width at
most 192; OpenCV's bilinear `cv2.resize`, PIL's bilinear where OpenCV is missing), scale to
[-1, 1], pad right with zeros to 3 x 48 x 192.

**Shifts** (on the rendered 8-bit image, before preprocessing): Gaussian noise (sigma 0.2 of
the range), Gaussian blur (sigma 1.5 and 2.5 px at the rendered size), low contrast (x 0.3 about
mid-grey), brightness (+0.35), JPEG at quality 10, inversion (light ink on dark).
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
PACKAGE = "rapidocr_onnxruntime"
VERSION = "1.4.4"
MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
MODEL_PATH = CACHE / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
LICENCE = "Apache-2.0 (wheel metadata of rapidocr_onnxruntime 1.4.4; PaddleOCR models)"
TASK = "rendered text lines, upright or rotated by 180 degrees"
FONTS = Path("/usr/share/fonts/truetype/dejavu")
SHAPE = (3, 48, 192)
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class Unavailable(RuntimeError):
    """The model cannot be fetched here (no package index, no pip)."""


def fetch_member(package: str, version: str, member: str, path: Path) -> Path:
    """`member` of the wheel `package==version`, downloaded (once) into bench/.cache/wheels/
    and unpacked to `path`."""
    if path.is_file():
        return path
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = next(iter(wheels.glob(f"{package}-{version}-*.whl")), None)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps"]
        proc = subprocess.run([*cmd, "-d", str(wheels)], capture_output=True, text=True)
        wheel = next(iter(wheels.glob(f"{package}-{version}-*.whl")), None)
        if proc.returncode != 0 or wheel is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"pip download {package}=={version} failed: {tail[0]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        path.write_bytes(archive.read(member))
    return path


def fetch_model() -> Path:
    """The classifier's .onnx, downloaded (once) from the wheel into bench/.cache/models/."""
    return fetch_member(PACKAGE, VERSION, MEMBER, MODEL_PATH)


# -- rendering ---------------------------------------------------------------------------------
def _fonts() -> list[Path]:
    return sorted(FONTS.glob("DejaVu*.ttf")) if FONTS.is_dir() else []


def render_line(rng: np.random.Generator, fonts: list[Path]) -> np.ndarray:
    """One upright text line, H x W x 3 uint8 (BGR order as OpenCV reads; grey anyway)."""
    from PIL import Image, ImageDraw, ImageFont

    words = [
        "".join(rng.choice(list(ALPHABET), size=int(rng.integers(2, 9))))
        for _ in range(int(rng.integers(1, 5)))
    ]
    text = " ".join(words)
    size = int(rng.integers(18, 40))
    if fonts:
        font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)
    else:
        font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    mx, my = int(rng.integers(2, 12)), int(rng.integers(2, 10))
    width, height = right - left + 2 * mx, bottom - top + 2 * my
    page = int(rng.integers(200, 256))
    ink = int(rng.integers(0, 80))
    image = Image.new("L", (width, height), page)
    ImageDraw.Draw(image).text((mx - left, my - top), text, fill=ink, font=font)
    grey = np.asarray(image)
    return np.repeat(grey[:, :, None], 3, axis=2)


def rotated_set(
    count: int,
    seed: int,
    render: Callable[[np.random.Generator, list[Path]], np.ndarray],
    label_of_turns: dict[int, int],
) -> tuple[list[np.ndarray], np.ndarray]:
    """`count` rendered images, cycling through the quarter turns (counter-clockwise, as
    `np.rot90`) that `label_of_turns` maps to the model's labels, and those labels."""
    rng = np.random.default_rng(seed)
    fonts = _fonts()
    turns = list(label_of_turns)
    images, labels = [], []
    for i in range(count):
        k = turns[i % len(turns)]
        images.append(np.ascontiguousarray(np.rot90(render(rng, fonts), k)))
        labels.append(label_of_turns[k])
    return images, np.array(labels, dtype=np.int64)


def render_set(count: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """`count` lines (half upright, half rotated by 180 degrees) and their labels (0 / 1)."""
    return rotated_set(count, seed, render_line, {0: 0, 2: 1})


# -- the package's preprocessing ----------------------------------------------------------------
def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    try:
        import cv2

        return cv2.resize(image, (width, height))
    except ImportError:
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_norm_img(image: np.ndarray) -> np.ndarray:
    """rapidocr_onnxruntime's TextClassifier.resize_norm_img, for cls_image_shape 3x48x192."""
    c, h, w = SHAPE
    ratio = image.shape[1] / float(image.shape[0])
    resized_w = w if math.ceil(h * ratio) > w else math.ceil(h * ratio)
    resized = _resize(image, resized_w, h).astype("float32")
    resized = resized.transpose((2, 0, 1)) / 255
    resized -= 0.5
    resized /= 0.5
    padded = np.zeros((c, h, w), dtype=np.float32)
    padded[:, :, :resized_w] = resized
    return padded


def preprocess(images: list[np.ndarray]) -> np.ndarray:
    return np.stack([resize_norm_img(im) for im in images]).astype(np.float32)


# -- shifts (uint8 H x W x 3 -> uint8 H x W x 3) ----------------------------------------------
def _noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = image.astype(np.float32) / 255 + rng.normal(0, 0.2, image.shape[:2])[:, :, None]
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def _blur(radius: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    def blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image, ImageFilter

        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))

    return blur


def _contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = (image.astype(np.float32) - 127.5) * 0.3 + 127.5
    return np.clip(x, 0, 255).round().astype(np.uint8)


def _brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = image.astype(np.float32) + 0.35 * 255
    return np.clip(x, 0, 255).round().astype(np.uint8)


def _jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=10)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def _invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - image


SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "gaussian noise 0.2": _noise,
    "blur 1.5": _blur(1.5),
    "blur 2.5": _blur(2.5),
    "low contrast 0.3": _contrast,
    "brightness +0.35": _brightness,
    "jpeg q10": _jpeg,
    "inversion": _invert,
}


def shifted(images: list[np.ndarray], shift: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return preprocess([SHIFTS[shift](im, rng) for im in images])
