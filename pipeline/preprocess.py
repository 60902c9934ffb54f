"""Preprocessing: the one definition shared by training, export, the on-device predictor and serving.

A model's preprocessing is a plain dict (JSON-serialisable) that travels with every artifact:

    {"input_size": [3, H, W], "resize_size": int, "crop_size": int,
     "interpolation": "bicubic" | "bilinear" | "nearest", "mean": [r, g, b], "std": [r, g, b],
     "channel_order": "RGB", "layout": "NCHW", "value_range": 1.0}

Meaning (the timm/torchvision eval convention): resize the shorter side to `resize_size` with
`interpolation`, center-crop `crop_size` x `crop_size`, scale pixels to [0, 1], subtract `mean`,
divide by `std`, lay out as NCHW float32 in RGB order.

This module needs only numpy and Pillow (no torch), so a phone build, a Raspberry Pi or the server
can import it. Training builds its torchvision transforms from the same dict (pipeline.data), and a
test checks that both give the same tensor.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Refuse decoding anything larger than this many pixels (a "pixel bomb"); callers may pass their own.
DEFAULT_MAX_PIXELS = 40_000_000

_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class BadImageError(ValueError):
    """The bytes are not a usable image. The message says what was wrong, for a 4xx answer."""


def make_preprocessing(input_size: int, mean, std, interpolation: str = "bilinear",
                       crop_pct: float = 0.875) -> dict:
    """Build the preprocessing dict from a model's pretrained config values."""
    if interpolation not in _PIL_INTERPOLATION:
        raise ValueError(f"interpolation must be one of {sorted(_PIL_INTERPOLATION)}, got {interpolation!r}")
    if not 0.1 <= crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in [0.1, 1.0], got {crop_pct}")
    return {
        "input_size": [3, int(input_size), int(input_size)],
        "resize_size": int(math.floor(input_size / crop_pct)),
        "crop_size": int(input_size),
        "interpolation": interpolation,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "channel_order": "RGB",
        "layout": "NCHW",
        "value_range": 1.0,
    }


def open_image(data: bytes | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image from bytes or a path into an RGB PIL image, safely.

    Handles EXIF orientation, grayscale, palette, RGBA (composited on white), CMYK and 16-bit
    images. Raises BadImageError for empty, truncated, unrecognised or oversized input.
    """
    if isinstance(data, (bytes, bytearray)):
        if len(data) == 0:
            raise BadImageError("the image file is empty (0 bytes)")
        source = io.BytesIO(data)
    else:
        source = data
    # Truncated files must fail, not decode half-grey.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise BadImageError(
                        f"the image is {width}x{height} = {width * height} pixels, more than the "
                        f"limit of {max_pixels}; resize it before sending")
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except BadImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImageError(f"the image is too large to decode safely: {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImageError("the data is not an image in a format Pillow can read "
                            "(send JPEG, PNG, WebP, BMP, GIF or TIFF)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise BadImageError(f"the image could not be decoded (truncated or corrupt?): {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a person would expect."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale the full range down to 8 bits instead of clipping at 255.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def resize_and_crop(im: Image.Image, pre: dict) -> Image.Image:
    """Resize the shorter side to resize_size, then center-crop crop_size (torchvision semantics)."""
    resize = int(pre["resize_size"])
    crop = int(pre["crop_size"])
    width, height = im.size
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    im = im.resize((new_w, new_h), _PIL_INTERPOLATION[pre["interpolation"]])
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    return im.crop((left, top, left + crop, top + crop))


def normalize(im: Image.Image, pre: dict) -> np.ndarray:
    """RGB PIL image of crop_size -> float32 CHW array, normalised with mean/std."""
    arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(pre["mean"], dtype=np.float32)) / np.asarray(pre["std"], dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(image: Image.Image | bytes | str, pre: dict,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any image (PIL, bytes or path) -> float32 array of shape input_size, ready for the model."""
    if not isinstance(image, Image.Image):
        image = open_image(image, max_pixels=max_pixels)
    else:
        image = to_rgb(ImageOps.exif_transpose(image))
    return normalize(resize_and_crop(image, pre), pre)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """One row of probabilities -> [{"label", "index", "probability"}] best first."""
    k = max(1, min(int(k), len(labels)))
    order = np.argsort(-probs)[:k]
    return [{"label": labels[i], "index": int(i), "probability": float(probs[i])} for i in order]
