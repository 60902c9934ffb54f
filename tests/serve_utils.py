"""Helpers for the serve tests: a tiny exported model (fp32 + int8 ONNX + model.json) and test images.

The model is a small conv net with the same contract as pipeline.export's output (input `input`
[N,3,H,W] with dynamic N, output `logits`, model card in metadata_props + model.json sidecar), so the
server tests do not depend on a full finetune/compress/export run.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

LABELS = ["circle", "square", "stripes"]
SIZE = 32


def make_tiny_export(export_dir: Path, size: int = SIZE, labels=LABELS, seed: int = 0) -> Path:
    """Write export_dir/{model.fp32.onnx, model.int8.onnx, model.json}; returns export_dir."""
    import onnx
    import torch

    from pipeline import modelcard
    from pipeline.preprocess import make_preprocessing

    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, len(labels))).eval()
    pre = make_preprocessing(size, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], interpolation="bilinear",
                             crop_pct=0.875)
    card = {"name": "tiny-test-net", "architecture": "tiny-conv", "labels": list(labels),
            "preprocessing": pre, "pipeline_version": "test", "accuracy": {},
            "files": {"fp32": "model.fp32.onnx", "int8": "model.int8.onnx", "ort": None},
            "recommended": {"cpu": "int8", "cuda": "fp32"}}
    fp32 = export_dir / "model.fp32.onnx"
    buf = io.BytesIO()
    torch.onnx.export(model, torch.zeros(1, 3, size, size), buf, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    modelcard.set_onnx_metadata(proto, card)
    onnx.save(proto, str(fp32))
    # int8: static QDQ quantisation like pipeline.export (batch-independent, unlike dynamic quantisation)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Calib(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(seed)
            self.items = iter([{"input": rng.normal(0, 1, (1, 3, size, size)).astype(np.float32)}
                               for _ in range(8)])

        def get_next(self):
            return next(self.items, None)

    int8 = export_dir / "model.int8.onnx"
    quantize_static(str(fp32), str(int8), Calib(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    proto = onnx.load(str(int8))
    modelcard.set_onnx_metadata(proto, card)
    onnx.save(proto, str(int8))
    (export_dir / "model.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    return export_dir


def offline_probs(model_file: Path, images: list) -> np.ndarray:
    """The ONNX model's probabilities for image bytes/paths, computed without the server."""
    from pipeline import modelcard, runtime
    from pipeline.preprocess import preprocess, softmax

    sess = runtime.make_session(model_file, device="cpu")
    card = modelcard.read_card_from_session(sess)
    x = np.stack([preprocess(im, card["preprocessing"]) for im in images])
    return softmax(sess.run(["logits"], {"input": x})[0].astype(np.float64))


def encode(im, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(size=(48, 40), seed=0):
    """An RGB PIL image with structure (so that preprocessing differences change the logits)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    arr = np.stack([(xx * 5) % 256, (yy * 7) % 256, ((xx + yy) * 3) % 256], axis=-1).astype(np.float64)
    arr += rng.normal(0, 20, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def odd_images() -> dict[str, bytes]:
    """Grayscale, RGBA, palette, CMYK, 16-bit and EXIF-rotated files (all must classify fine)."""
    from PIL import Image

    base = photo()
    out = {
        "rgb.jpg": encode(base, "JPEG", quality=92),
        "rgb.png": encode(base, "PNG"),
        "gray.png": encode(base.convert("L"), "PNG"),
        "rgba.png": encode(base.convert("RGBA"), "PNG"),
        "palette.gif": encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "cmyk.jpg": encode(base.convert("CMYK"), "JPEG"),
        "gray16.png": encode(Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257), "PNG"),
        "webp.webp": encode(base, "WEBP"),
        "bmp.bmp": encode(base, "BMP"),
    }
    exif = Image.Exif()
    exif[0x0112] = 6   # orientation: rotate 90 CW on display
    out["exif_rot.jpg"] = encode(base.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif)
    return out


def bad_inputs() -> dict[str, bytes]:
    """Files that must be refused with a 4xx."""
    good = encode(photo(), "JPEG")
    from PIL import Image

    bomb = encode(Image.new("L", (2500, 2500)), "PNG")   # 6.25 MP in ~10 KB; tests set max_pixels=1e6
    return {"empty.jpg": b"", "text.jpg": b"this is not an image at all" * 10, "truncated.jpg": good[: len(good) // 2],
            "pdf.pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\n", "bomb.png": bomb}
