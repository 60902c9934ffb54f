"""Helpers for the serve tests: a tiny exported model (fp32 + int8 ONNX + model.json) and test images.

The model is a small conv net with the same contract as pipeline.export's output (input `input`
[N,3,H,W] with dynamic N, output `logits`, model card in metadata_props + model.json sidecar), so the
server tests do not depend on a full finetune/compress/export run.
"""
from __future__ import annotations

import contextlib
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


# --------------------------------------------------------------------------- a real server subprocess
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(export: Path, tmp: Path, **settings):
    """`bentoml serve` over `export` on a free loopback port (serving.launcher, the launcher that
    `python -m pipeline serve` uses); yields {"url", "proc", "port", "export", "log"}; stopped after."""
    from serving import launcher

    port = free_port()
    env = {"EDGEPIPE_MODEL": str(export), "EDGEPIPE_THREADS": "1", "BENTOML_HOME": str(tmp / "bentoml_home"),
           "HF_HUB_OFFLINE": "1", **{f"EDGEPIPE_{k.upper()}": str(v) for k, v in settings.items()}}
    log_path = tmp / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = launcher.launch(env, "127.0.0.1", port, stdout=log, new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            launcher.wait_ready(url, proc, timeout=60, log=log_path)
            yield {"url": url, "proc": proc, "port": port, "export": Path(export), "log": log_path}
        finally:
            launcher.stop(proc)


# ------------------------------------------------------------------------ hostile and odd inputs
def png_bytes(width: int, height: int, bit_depth: int = 8, color: int = 0, rows: bytes | None = None) -> bytes:
    """A PNG written by hand, so that any declared size can be made (zero rows compress to almost nothing)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    row = 1 + width * channels * bit_depth // 8
    if rows is None:
        comp = zlib.compressobj(9)
        zero = bytes(min(row, 1 << 20))
        out = []
        for _ in range(height):
            left = row
            while left:
                n = min(left, len(zero))
                out.append(comp.compress(zero[:n]))
                left -= n
        rows_z = b"".join(out) + comp.flush()
    else:
        rows_z = zlib.compress(rows, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows_z) + chunk(b"IEND", b"")


def tiff_broken_tag() -> bytes:
    """A 4x4 grayscale TIFF whose StripOffsets tag is ASCII: Pillow raises TypeError while loading."""
    import struct

    entries = [(256, 3, 1, struct.pack("<HH", 4, 0)), (257, 3, 1, struct.pack("<HH", 4, 0)),
               (258, 3, 1, struct.pack("<HH", 8, 0)), (259, 3, 1, struct.pack("<HH", 1, 0)),
               (262, 3, 1, struct.pack("<HH", 1, 0)), (273, 2, 1, b"a\0\0\0"),
               (277, 3, 1, struct.pack("<HH", 1, 0)), (278, 3, 1, struct.pack("<HH", 4, 0)),
               (279, 4, 1, struct.pack("<I", 16))]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", t, k, n) + v for t, k, n, v in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + bytes(16)


def webp_broken_exif() -> bytes:
    """A valid WebP whose EXIF block is cut short: Pillow's getexif raises struct.error."""
    return encode(photo(), "WEBP", exif=b"II*\x00\x08\x00")


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small JPEG whose SOF0 header claims width x height (a decompression bomb header)."""
    import struct

    data = bytearray(encode(photo(), "JPEG"))
    at = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


def decode_bombs() -> dict[str, bytes]:
    """The issue's tiny files that asked for gigabytes: all must get a 4xx before decoding."""
    return {"png_100000x1": png_bytes(100_000, 1), "png_1000000x1": png_bytes(1_000_000, 1),
            "png_40000000x1": png_bytes(40_000_000, 1), "png16_6000x6666": png_bytes(6000, 6666, bit_depth=16),
            "jpeg_65500x65500": jpeg_with_size(65500, 65500)}


def broken_files() -> dict[str, bytes]:
    """Files that must be refused with a 4xx under the default limits (decode errors, refused formats,
    absurd sizes)."""
    from PIL import Image

    good = encode(photo(), "JPEG")
    png = encode(photo(), "PNG")
    out = {**{k: v for k, v in bad_inputs().items() if k != "bomb.png"}, **decode_bombs(),
           "webp_broken_exif": webp_broken_exif(), "tiff_broken_tag": tiff_broken_tag(),
           "png_51x1_aspect": png_bytes(51 * 20, 20), "png_zero_width": png_bytes(0, 10, rows=b""),
           "png_bad_ihdr_crc": png[:30] + bytes([png[30] ^ 0xFF]) + png[31:],
           "png_truncated_idat": png[: len(png) // 2],
           "gif_truncated": encode(photo(), "GIF")[:60], "bmp_truncated": encode(photo(), "BMP")[:100],
           "jpeg_header_only": good[:200], "webp_truncated": encode(photo(), "WEBP")[:40],
           "ico_refused_format": encode(photo(), "ICO"), "tga_refused_format": encode(photo(), "TGA"),
           "pcx_refused_format": encode(photo(), "PCX"), "eps_refused_format": b"%!PS-Adobe-3.0 EPSF-3.0\n"
                                                                              b"%%BoundingBox: 0 0 10 10\n",
           "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
           "html": b"<!doctype html><html><img src='http://127.0.0.1:1/x.jpg'></html>",
           "zip": b"PK\x03\x04" + bytes(60), "elf": b"\x7fELF\x02\x01\x01" + bytes(60),
           "json_url": b'{"image": "http://127.0.0.1:1/x.jpg"}', "nul_bytes": bytes(4096)}
    tiny = Image.new("L", (1, 1))
    out["tiff_64kx64k_header"] = _tiff_claiming(encode(tiny, "TIFF"), 65535, 65535)
    return out


def _tiff_claiming(tiff: bytes, width: int, height: int) -> bytes:
    """Rewrite the ImageWidth/ImageLength tags of a little-endian TIFF written by Pillow."""
    import struct

    data = bytearray(tiff)
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", data, at)
        if tag in (256, 257):
            value = width if tag == 256 else height
            struct.pack_into("<I" if kind == 4 else "<H", data, at + 8, value)
    return bytes(data)


def odd_good_files() -> dict[str, bytes]:
    """Unusual but valid files: all must classify (200)."""
    from PIL import Image

    base = photo()
    frames = [photo(seed=s) for s in range(3)]
    anim = io.BytesIO()
    frames[0].save(anim, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    arr32 = (np.asarray(base.convert("L"), np.int32) * 200)
    return {**odd_images(), "animated.gif": anim.getvalue(), "one_pixel.png": encode(Image.new("RGB", (1, 1)), "PNG"),
            "aspect_50x1.png": png_bytes(50 * 20, 20), "int32.tiff": encode(Image.fromarray(arr32), "TIFF"),
            "float.tiff": encode(Image.fromarray(np.asarray(base.convert("L"), np.float32) / 255.0), "TIFF"),
            "cmyk.tiff": encode(base.convert("CMYK"), "TIFF"), "rgb16.png": png_bytes(20, 10, 16, 2),
            "palette_transparent.png": encode(base.convert("P"), "PNG", transparency=0),
            "la.png": encode(base.convert("LA"), "PNG"), "lzw.tiff": encode(base, "TIFF", compression="tiff_lzw")}


def mutated_files(seed: int = 0, per_format: int = 6) -> dict[str, bytes]:
    """Seeded mutations of valid files (byte flips, overwritten header bytes, cuts, repeated slices):
    each must get 200 or a 4xx, never a 5xx. Deterministic: the same bytes on every run."""
    rng = np.random.default_rng(seed)
    out = {}
    for fmt, kw in (("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {})):
        valid = encode(photo(seed=1), fmt, **kw)
        for i in range(per_format):
            data = bytearray(valid)
            how = i % 4
            if how == 0:     # random byte flips anywhere
                for at in rng.integers(0, len(data), size=8):
                    data[at] ^= int(rng.integers(1, 256))
            elif how == 1:   # header bytes overwritten (sizes, modes, offsets live there)
                for at in rng.integers(0, min(64, len(data)), size=4):
                    data[at] = int(rng.integers(0, 256))
            elif how == 2:   # cut at a random point
                data = data[: int(rng.integers(8, len(data)))]
            else:            # a slice repeated (duplicated chunks / markers)
                a = int(rng.integers(0, len(data) - 16))
                data = data[:a] + data[a:a + 64] * 3 + data[a:]
            out[f"mutated_{fmt.lower()}_{i}"] = bytes(data)
    return out


BAD_K = ["--1", "+-2", "\u00b2", "9" * 5000, "-1", "+1", " 1", "1 ", "1\n", "0x1", "1e1", "1.0", "\u0663",
         "\uff13", "1_0", "0", "00000", "99999", "abc", "NaN", "true", "[1]", "\u00bd"]


def file_part(name, data, ctype="application/octet-stream"):
    return {"files": {"image": (name, data, ctype)}}


def hostile_requests(url_port: int) -> list[tuple[str, dict, str]]:
    """The hostile corpus as POST /classify requests: (name, httpx request kwargs, expected status:
    '200' | '4xx' | '200|4xx'). URLs in it point at `url_port` on loopback (a port that must never
    be connected to). Used by tests/test_serve_hostile.py and benchmarks/serve_hardening.py."""
    good = encode(photo(), "PNG")
    url = f"http://127.0.0.1:{url_port}/x.jpg"
    cases = [(f"file:{n}", file_part(n, d), "4xx") for n, d in broken_files().items()]
    cases += [(f"file:{n}", file_part(n, d), "200") for n, d in odd_good_files().items()]
    cases += [(f"fuzz:{n}", file_part(n, d), "200|4xx") for n, d in mutated_files().items()]
    cases += [(f"k:{k[:12]!r}", {**file_part("a.png", good), "data": {"k": k}}, "4xx") for k in BAD_K]
    cases += [(f"query_k:{k[:12]!r}", {**file_part("a.png", good), "params": {"k": k}}, "4xx") for k in BAD_K[:6]]
    cases += [("k:'0003'", {**file_part("a.png", good), "data": {"k": "0003"}}, "200"),
              ("path_traversal_filename", file_part("../../etc/passwd", good), "200"),
              ("url_as_text_field", {"data": {"image": url}, "files": {"other": ("x", b"x")}}, "4xx"),
              ("server_path_as_text", {"data": {"image": "/etc/passwd"}, "files": {"other": ("x", b"x")}}, "4xx"),
              ("url_urlencoded", {"data": {"image": url}}, "4xx"),
              ("url_json", {"json": {"image": url}}, "4xx"),
              ("no_body", {}, "4xx"),
              ("text_plain", {"content": url.encode(), "headers": {"Content-Type": "text/plain"}}, "4xx"),
              ("raw_broken_png", {"content": good[:50], "headers": {"Content-Type": "image/png"}}, "4xx"),
              ("multipart_garbage", {"content": b"--b\r\nnope", "headers": {"Content-Type": "multipart/form-data; "
                                                                                       "boundary=b"}}, "4xx"),
              ("multipart_no_boundary", {"content": b"x", "headers": {"Content-Type": "multipart/form-data"}}, "4xx"),
              ("too_many_fields", {**file_part("a.png", good), "data": {f"f{i}": "x" for i in range(40)}}, "4xx"),
              ("too_many_files", {"files": [("image", (f"{i}.png", good, "image/png")) for i in range(8)]}, "4xx"),
              ("k_as_file", {"files": {"image": ("a.png", good, "image/png"), "k": ("k.txt", b"2")}}, "4xx")]
    return cases
