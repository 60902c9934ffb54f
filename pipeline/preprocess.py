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

import contextlib
import dataclasses
import functools
import io
import math
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageFile

# Changes whenever open_image accepts or refuses other files than before, so caches of "which files
# are readable" (pipeline.data's data_check.json) can be keyed on it. 2: issue 12 (formats, budget, aspect).
DECODER_VERSION = 2
# Refuse decoding anything larger than this many pixels (a "pixel bomb"); callers may pass their own.
DEFAULT_MAX_PIXELS = 40_000_000
# Peak decoding memory per image (see decode_bytes): a 40 MP RGB photo needs 160 MB, a 24 MP one
# with EXIF rotation 192 MB; a 40 MP 16-bit grayscale PNG (75 KB on disk) would need 400 MB: refused.
DEFAULT_MAX_DECODE_MB = 256
# Longest side / shortest side. Resizing the shorter side first makes the intermediate image grow
# with the aspect ratio (a 92-byte 100000x1 PNG became a 25600000x256 image: 2 GB). At 50:1 the
# intermediate is at most resize_size^2 x 50 x 4 bytes (13 MB at 256 px), while real panoramas
# (phones: 4:1 to ~12:1, 360-degree strips ~20:1) still pass; past 50:1 the center crop keeps under
# 2% of the picture, so no useful prediction is lost.
DEFAULT_MAX_ASPECT_RATIO = 50.0
# The formats the predictor and the server open (Image.open(formats=...)): camera/phone/web formats.
# Everything else Pillow could parse (EPS through Ghostscript, PSD, ICO, TGA, PCX, SGI, ...) is
# refused unread: less decoder surface for files from strangers. (Multi-picture JPEGs from phones,
# MPO, come in through the JPEG opener.)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Pillow's in-memory size of one pixel of a decoded frame (multi-band 8-bit modes use 4 bytes).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}
# Extra full-size bytes per pixel that to_rgb allocates on the way to 8-bit RGB (see to_rgb).
_TO_RGB_EXTRA = {"RGB": 0, "I;16": 8, "I;16B": 8, "I;16L": 8, "I;16N": 8, "I": 10, "F": 10,
                 "RGBA": 16, "LA": 16, "PA": 16, "RGBa": 16, "La": 16, "P": 20}
_MODE_NAMES = {"I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I;16L": "16-bit grayscale",
               "I": "32-bit grayscale", "F": "floating-point grayscale", "L": "grayscale", "P": "palette"}
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}

_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

class BadImageError(ValueError):
    """The bytes are not a usable image. The message says what was wrong, for a 4xx answer."""


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """What open_image accepts. The server builds one from its settings; the defaults are the
    predictor's and the dataset check's, and a server with default settings answers like them."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decode_bytes: int = DEFAULT_MAX_DECODE_MB * 1_000_000
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    formats: tuple = ACCEPTED_FORMATS


class DecodeSlots:
    """At most `n` decodes at once in this process (default: the usable cores).

    Decoding is CPU- and memory-bound: more decodes than cores finish no sooner, but each holds its
    full-size frame meanwhile (the server used to run up to 40 at once, anyio's thread pool size).
    """

    def __init__(self, n: int | None = None):
        self.resize(n)

    def resize(self, n: int | None) -> None:
        self.n = int(n) if n else _usable_cores()
        self._sem = threading.BoundedSemaphore(self.n)

    @contextlib.contextmanager
    def hold(self):
        sem = self._sem
        with sem:
            yield


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # not on Linux
        return max(1, os.cpu_count() or 1)


_DECODE_SLOTS = DecodeSlots()


def set_decode_concurrency(n: int | None) -> int:
    """Size the process-wide decode gate (0/None = usable cores); returns the size."""
    _DECODE_SLOTS.resize(n)
    return _DECODE_SLOTS.n


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


def open_image(data, max_pixels: int | None = None, limits: DecodeLimits | None = None) -> Image.Image:
    """Decode an image from bytes or a path into an RGB PIL image, within a memory budget.

    Handles EXIF orientation, grayscale, palette, RGBA (composited on white), CMYK and 16-bit
    images; only the first frame of animations. Every failure, whatever Pillow raised inside
    (struct.error, TypeError, OverflowError, MemoryError, ...), becomes BadImageError with a message
    fit for a 4xx answer: this is the one catch-all of the input path, shared by the server, the
    predictor and the dataset check (so data.bad_images=skip really skips).
    """
    limits = limits or DecodeLimits()
    if max_pixels is not None:
        limits = dataclasses.replace(limits, max_pixels=int(max_pixels))
    ImageFile.LOAD_TRUNCATED_IMAGES = False   # global in Pillow: make sure no other library turned it on
    try:
        with _DECODE_SLOTS.hold(), _opened(data) as source, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(source, formats=list(limits.formats))
            except Image.UnidentifiedImageError:
                raise BadImageError(f"the data is not an image in an accepted format (send "
                                    f"{', '.join(limits.formats)})") from None
            # size first: reading EXIF can decode the whole image (PNG looks for an eXIf chunk after
            # the pixel data), so a bomb would be decoded before the budget said no
            check_budget(im.size, im.mode, limits)
            transpose = _orientation(im)
            if transpose is not None:
                check_budget(im.size, im.mode, limits, transposed=True)
            im.load()
            return _upright_rgb(im, transpose)
    except BadImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImageError(f"the image is too large to decode safely ({e}); resize it before sending") from None
    except MemoryError:
        raise BadImageError("not enough memory to decode this image; send a smaller image") from None
    except Exception as e:  # noqa: BLE001 - the catch-all: any decoder error is the file's fault, never a 500
        detail = str(e).strip() or "no detail"
        raise BadImageError(f"the image could not be decoded ({type(e).__name__}: {detail[:200]}); the file "
                            f"is corrupt or truncated: re-save it as JPEG or PNG") from None


@contextlib.contextmanager
def _opened(data):
    """bytes/bytearray/memoryview -> BytesIO (no copy of bytes); a path -> an open file closed afterwards.

    The file object is ours (not Pillow's), so the returned image never holds an open descriptor and
    no full-size copy is needed to detach it from its file.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise BadImageError("the image file is empty (0 bytes)")
        yield io.BytesIO(data)
    elif isinstance(data, (str, os.PathLike)):
        try:
            f = open(data, "rb")
        except OSError as e:
            raise BadImageError(f"cannot read {os.fspath(data)!r}: {e.strerror or e}") from None
        with f:
            if os.fstat(f.fileno()).st_size == 0:
                raise BadImageError("the image file is empty (0 bytes)")
            yield f
    else:
        raise BadImageError(f"an image must be file bytes or a path, got {type(data).__name__}")


def _orientation(im: Image.Image):
    """The transposition that EXIF orientation asks for, or None (read before decoding the pixels)."""
    return _EXIF_TRANSPOSE.get(im.getexif().get(0x0112, 1))


def _upright_rgb(im: Image.Image, transpose) -> Image.Image:
    """Mode conversion then EXIF transposition: both are exact per-pixel / pixel-shuffling operations, so
    the order does not change a single value; converting first means the transposition copies 8-bit RGB
    and an upright RGB image is returned as it was decoded, without the full-size copy that
    ImageOps.exif_transpose always makes."""
    im = to_rgb(im)
    return im.transpose(transpose) if transpose is not None else im


def check_budget(size, mode: str, limits: DecodeLimits, transposed: bool = False) -> None:
    """Refuse, before decoding, an image whose size, aspect ratio or decoding memory is over the limits."""
    width, height = size
    if width < 1 or height < 1:
        raise BadImageError(f"the image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise BadImageError(f"the image is {width}x{height} = {width * height} pixels, more than the limit "
                            f"of {limits.max_pixels}; resize it before sending")
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect_ratio:
        raise BadImageError(f"the image is {width}x{height}, an aspect ratio of {aspect:.0f}:1, over the limit "
                            f"of {limits.max_aspect_ratio:g}:1; crop it to the subject before sending")
    need = decode_bytes(size, mode, transposed)
    if need > limits.max_decode_bytes:
        raise BadImageError(f"decoding this {width}x{height} {_MODE_NAMES.get(mode, mode)} image needs "
                            f"~{need / 1e6:.0f} MB, over the budget of {limits.max_decode_bytes / 1e6:.0f} MB; "
                            f"resize it or save it as 8-bit RGB before sending")


def decode_bytes(size, mode: str, transposed: bool = False) -> int:
    """Peak memory of open_image for this size and mode: the decoded frame, every full-size
    intermediate of to_rgb, and the transposed copy. Pillow keeps multi-band 8-bit images at 4 bytes
    a pixel (so RGB costs 4, not 3)."""
    per_pixel = _MODE_BYTES.get(mode, 4) + _TO_RGB_EXTRA.get(mode, 4) + (4 if transposed else 0)
    return int(size[0]) * int(size[1]) * per_pixel


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a person would expect."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16"):
        # 16-bit grayscale: scale the full range down to 8 bits instead of clipping at 255. A lookup
        # table of the same float formula gives the same bytes at 1 byte per pixel, instead of
        # two full-size float64 arrays (16 bytes per pixel: ~0.8 GB for a 40 MP file of 75 KB).
        return Image.fromarray(_LUT16[np.asarray(im)]).convert("RGB")     # uint8 2-D -> mode L
    if im.mode in ("I", "F"):
        return Image.fromarray(_scale_to_8bit(np.asarray(im), im.mode)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


_LUT16 = np.clip(np.arange(65536, dtype=np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _scale_to_8bit(arr: np.ndarray, mode: str, rows: int = 256) -> np.ndarray:
    """32-bit int / float grayscale -> uint8 with the full range scaled (int: 65535 or 255 at the top,
    float: 1.0 or 255), in blocks of rows so the float64 temporaries stay small."""
    if mode == "I":
        top = 255.0 if arr.max() <= 255 else 65535.0
    else:
        top = 1.0 if arr.max() <= 1.0 else 255.0
    out = np.empty(arr.shape, dtype=np.uint8)
    for r in range(0, arr.shape[0], rows):
        out[r:r + rows] = np.clip(arr[r:r + rows].astype(np.float64) / top * 255.0 + 0.5, 0, 255)
    return out


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
    """RGB PIL image of crop_size -> float32 CHW array, (pixel / 255 - mean) / std.

    A pixel has 256 values, so each channel is a lookup in a table of the same float32 formula: the same
    bits as computing it per pixel, at about 0.6 of the time (a third of a request's preprocessing was this
    arithmetic; docs/speed.md)."""
    table = _normalize_table(tuple(map(float, pre["mean"])), tuple(map(float, pre["std"])))
    out = np.empty((3, im.size[1], im.size[0]), dtype=np.float32)
    for c, band in enumerate(im.split()):
        np.take(table[c], np.asarray(band), out=out[c])
    return out


@functools.lru_cache(maxsize=16)
def _normalize_table(mean: tuple, std: tuple) -> np.ndarray:
    values = np.arange(256, dtype=np.float32) / np.float32(255.0)
    table = (values[None, :] - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]
    table.setflags(write=False)
    return table


def preprocess(image: Image.Image | bytes | str, pre: dict, max_pixels: int | None = None,
               limits: DecodeLimits | None = None) -> np.ndarray:
    """Any image (PIL, bytes or path) -> float32 array of shape input_size, ready for the model."""
    if not isinstance(image, Image.Image):
        image = open_image(image, max_pixels=max_pixels, limits=limits)
    else:
        image = _guarded_pil(image, limits or DecodeLimits())
    return normalize(resize_and_crop(image, pre), pre)


def _guarded_pil(image: Image.Image, limits: DecodeLimits) -> Image.Image:
    """An already decoded PIL image (in-process callers): the same size checks and errors as files."""
    try:
        check_budget(image.size, image.mode, limits)
        return _upright_rgb(image, _orientation(image))
    except BadImageError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a broken EXIF block of an image opened by the caller
        raise BadImageError(f"the image could not be used ({type(e).__name__}: {e})") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """One row of probabilities -> [{"label", "index", "probability"}] best first."""
    k = max(1, min(int(k), len(labels)))
    order = np.argsort(-probs)[:k]
    return [{"label": labels[i], "index": int(i), "probability": float(probs[i])} for i in order]
