"""Unit tests of the serve stage in-process: model resolution, settings, the service class, the parser."""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from serve_utils import LABELS, bad_inputs, encode, make_tiny_export, odd_images, offline_probs, photo


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_tiny_export(tmp_path_factory.mktemp("serve_unit") / "export")


@pytest.fixture(scope="module")
def service_module(export):
    """serving.service imported with EDGEPIPE_* set (the decorator reads them at import time)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEPIPE_MODEL", str(export))
    mp.setenv("EDGEPIPE_MAX_PIXELS", "1000000")
    mp.setenv("EDGEPIPE_THREADS", "1")
    for name in ("serving.service", "serving.settings"):
        sys.modules.pop(name, None)
    module = importlib.import_module("serving.service")
    yield module
    mp.undo()
    sys.modules.pop("serving.service", None)


@pytest.fixture(scope="module")
def svc(service_module):
    return service_module.ImageClassifier()   # bentoml's Service.__call__ -> an instance of the class


# ----------------------------------------------------------------------------- model resolution
def test_resolve_model_auto_explicit_and_missing(export, tmp_path):
    from serving.model_files import ModelSpecError, resolve_model

    path, info = resolve_model(export, "auto", "cpu")
    assert path.name == "model.int8.onnx" and info["variant"] == "int8" and info["provider"] == "cpu"
    assert resolve_model(export, "fp32", "cpu")[0].name == "model.fp32.onnx"
    assert resolve_model(export / "model.fp32.onnx")[0].name == "model.fp32.onnx"
    with pytest.raises(FileNotFoundError, match="make export"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="make export"):
        resolve_model(tmp_path / "empty")
    card = json.loads((export / "model.json").read_text())
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model.json").write_text(json.dumps({**card, "files": {"fp32": "model.fp32.onnx", "int8": None}}))
    with pytest.raises(FileNotFoundError, match="int8"):
        resolve_model(partial, "int8", "cpu")
    with pytest.raises(FileNotFoundError, match="make export"):
        resolve_model(partial, "fp32", "cpu")   # listed but not there
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ModelSpecError, match="not an ONNX model"):
        resolve_model(tmp_path / "x.txt")


def test_serve_run_errors_name_make_export(make_config, tmp_path):
    from pipeline import serve

    cfg = make_config(f"run.dir={tmp_path / 'empty_run'}")
    with pytest.raises(FileNotFoundError, match="make export"):
        serve.run(cfg)


def test_service_env_and_stage_for_bento(make_config, export, tmp_path):
    import shutil

    from pipeline import serve
    from serving.settings import load_settings

    run_dir = tmp_path / "run"
    shutil.copytree(export, run_dir / "export")
    cfg = make_config(f"run.dir={run_dir}", "serve.port=3123", "serve.max_body_mb=2.5", "serve.top_k=2")
    model, _ = serve._resolve_for_cfg(cfg)
    env = serve.service_env(cfg, model)
    assert env["EDGEPIPE_MODEL"].endswith("model.int8.onnx") and env["EDGEPIPE_PORT"] == "3123"
    s = load_settings(env)
    assert s.serve.max_body_mb == 2.5 and s.serve.top_k == 2 and s.serve.host == "127.0.0.1"
    assert s.model == env["EDGEPIPE_MODEL"]
    staged = serve.stage_for_bento(cfg, dest=tmp_path / "staged")
    assert sorted(staged["files"]) == ["model.fp32.onnx", "model.int8.onnx", "model.json"]
    assert serve.resolve_model(tmp_path / "staged", "auto", "cpu")[0].name == "model.int8.onnx"


def test_settings_reject_bad_env():
    from serving.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="EDGEPIPE_MAX_BODY_MB"):
        load_settings({"EDGEPIPE_MAX_BODY_MB": "ten"})
    with pytest.raises(SettingsError, match="EDGEPIPE_MAX_BATCH_SIZE must be >= 2"):
        load_settings({"EDGEPIPE_MAX_BATCH_SIZE": "1"})
    with pytest.raises(SettingsError, match="VARIANT"):
        load_settings({"EDGEPIPE_MODEL_VARIANT": "fp64"})


# ------------------------------------------------------------------------------ the service class
def test_service_loads_card_and_is_ready(svc, export):
    assert svc.ready and svc.__is_ready__()
    assert svc.labels == LABELS and svc.model_path.name == "model.int8.onnx"
    assert svc.providers == ["CPUExecutionProvider"]
    card = asyncio.run(svc.model_card())
    assert card["labels"] == LABELS and card["serving"]["num_classes"] == 3


class _RecordingSession:
    """The service's real session, recording each batch size it runs (optionally with a wrong class count)."""

    def __init__(self, real, classes=None):
        self.real, self.classes, self.sizes = real, classes, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def run(self, outputs, feeds):
        batch = next(iter(feeds.values()))
        self.sizes.append(len(batch))
        out = self.real.run(outputs, feeds)
        return out if self.classes is None else [np.zeros((len(batch), self.classes), np.float32)]


def test_warm_up_runs_every_batch_size_adaptive_batching_forms_on_cuda(svc, service_module, monkeypatch):
    """#9: the service warms up through runtime.warm_up: on CUDA 1..serve.max_batch_size (cuDNN picks algorithms
    per shape), on the CPU 1, 2 and the largest; every output is checked against the card."""
    from pipeline import runtime

    largest = service_module.SERVE.max_batch_size
    monkeypatch.setattr(svc, "session", _RecordingSession(svc.session))
    svc._warm_up()
    assert svc.session.sizes == [1, 2, largest]  # this machine: the CPU
    monkeypatch.setattr(runtime, "session_device", lambda session: "cuda")
    monkeypatch.setattr(svc, "session", _RecordingSession(svc.session.real))
    svc._warm_up()
    assert svc.session.sizes == list(range(1, largest + 1))
    monkeypatch.setattr(svc, "session", _RecordingSession(svc.session.real, classes=len(svc.labels) + 1))
    with pytest.raises(RuntimeError, match=r"warm-up inference gave shape \(1, 4\) \(expected \(1, 3\)\)"):
        svc._warm_up()


def test_classify_matches_offline_onnx_for_odd_formats(svc, export):
    images = odd_images()
    names = sorted(images)
    want = offline_probs(export / "model.int8.onnx", [images[n] for n in names])
    for name, row in zip(names, want):
        out = svc.classify_bytes(images[name], k=3)
        assert out["status"] == 200, (name, out)
        got = np.zeros(3)
        for p in out["predictions"]:
            got[p["index"]] = p["probability"]
        np.testing.assert_allclose(got, row, atol=1e-5, err_msg=name)


def test_batch_of_mixed_good_and_bad_items(svc, service_module):
    m = service_module
    good = [m.make_item(encode(photo(seed=s), "PNG"), "2", svc.pre, 3) for s in range(3)]
    bad = m.make_item(b"", None, svc.pre, 3)
    out = svc.classify([good[0], bad, good[1], good[2]])
    assert [r.status_code for r in out] == [200, 400, 200, 200]
    single = [svc.classify([g])[0] for g in good]
    for batched, alone in zip([out[0], out[2], out[3]], single):   # batching does not change results
        a, b = json.loads(batched.body)["predictions"], json.loads(alone.body)["predictions"]
        assert [p["index"] for p in a] == [p["index"] for p in b] and len(a) == 2
        np.testing.assert_allclose([p["probability"] for p in a], [p["probability"] for p in b], atol=1e-6)


def test_bad_images_and_k(svc):
    for name, data in bad_inputs().items():
        out = svc.classify_bytes(data)
        assert out["status"] == 400 and out["error"], name
    ok = odd_images()["rgb.png"]
    for k in (0, 4, -1, "abc", "2.5", 2.5, True, [1]):
        out = svc.classify_bytes(ok, k=k)
        assert out["status"] == 400 and "k must" in out["error"], k
    assert len(svc.classify_bytes(ok)["predictions"]) == 3            # default top_k 5 capped at 3 classes
    assert len(svc.classify_bytes(ok, k="1")["predictions"]) == 1
    assert svc.classify_bytes({"image": "/etc/passwd"})["status"] == 400


def test_preprocessing_conversions(svc):
    """EXIF rotation is applied; grayscale/16-bit/RGBA/palette/CMYK give an RGB tensor of the right shape."""
    from pipeline.preprocess import open_image, preprocess

    images = odd_images()
    upright = preprocess(images["rgb.jpg"], svc.pre)
    rotated = preprocess(images["exif_rot.jpg"], svc.pre)
    assert np.abs(rotated - upright).mean() < 0.1   # same picture once the EXIF orientation is applied
    assert open_image(images["exif_rot.jpg"]).size == photo().size
    for name, data in images.items():
        im = open_image(data)
        assert im.mode == "RGB", name
        assert preprocess(data, svc.pre).shape == (3, 32, 32)
    g16 = np.asarray(open_image(images["gray16.png"]))
    g8 = np.asarray(open_image(images["gray.png"]))
    assert np.abs(g16.astype(int) - g8.astype(int)).max() <= 1   # 16-bit scaled down, not clipped to white


# ------------------------------------------------------------------------- the HTTP request parser
def _request(body: bytes, content_type: str | None, query: str = ""):
    from starlette.requests import Request

    headers = [(b"content-length", str(len(body)).encode())]
    if content_type:
        headers.append((b"content-type", content_type.encode()))
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/classify", "headers": headers,
                    "query_string": query.encode()}, receive)


def _multipart(fields: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    boundary = "b0undary"
    parts = []
    for name, filename, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_request_parser(service_module):
    m = service_module
    img = odd_images()["rgb.png"]

    def parse(body, ctype, query=""):
        return asyncio.run(m.read_classify_request(_request(body, ctype, query)))

    body, ctype = _multipart([("image", "a.png", img), ("k", None, b"2")])
    assert parse(body, ctype) == (img, "2")
    assert parse(img, "image/png", "k=1") == (img, "1")
    cases = [
        (_multipart([("photo", "a.png", img)]), 400, "missing file field"),
        (_multipart([("image", None, b"http://example.com/a.jpg")]), 400, "file upload"),
        (_multipart([("image", "a.png", img), ("k", "k.txt", b"2")]), 400, "k"),
        ((b'{"image": "/etc/passwd"}', "application/json"), 415, "JSON"),
        ((img, None), 415, "Content-Type"),
        ((b"--x\r\nbroken", "multipart/form-data; boundary=x"), 400, "multipart"),
    ]
    for (body, ctype), status, word in cases:
        with pytest.raises(m.RequestProblem) as e:
            parse(body, ctype)
        assert e.value.status == status and word.lower() in e.value.message.lower(), e.value.message



# ------------------------------------------------------------------------------ early limits (ASGI)
def _asgi_call(mw, chunks, headers, delay: float = 0.0):
    """Run the middleware on one request; returns (status, headers dict, body, number of receive() calls)."""
    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent, calls = [], [0]

    async def receive():
        calls[0] += 1
        if delay:
            await asyncio.sleep(delay)
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(mw({"type": "http", "method": "POST", "path": "/classify", "headers": headers}, receive, send))
    head = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], head, b"".join(m.get("body", b"") for m in sent[1:]), calls[0]


def _echo_app(seen):
    async def app(scope, receive, send):
        msg = await receive()
        seen["body"] = msg["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


def test_early_limits_size_deadline_budget_and_slots():
    from serving.limits import EarlyLimits

    seen = {}
    mw = EarlyLimits(_echo_app(seen), max_body_bytes=10, body_timeout=0.3, max_concurrency=2, max_buffered_bytes=100)
    cl = lambda n: [(b"content-length", str(n).encode())]   # noqa: E731
    assert _asgi_call(mw, [b"12345"], cl(5))[:3:2] == (200, b"ok")
    # over-size Content-Length: 413 before the body is read at all, and the connection is closed
    status, head, body, calls = _asgi_call(mw, [b"x" * 11], cl(11) + [(b"expect", b"100-continue")])
    assert (status, head.get("connection"), calls) == (413, "close", 0) and b"max_body_mb" in body
    # chunked: buffered up to the limit and replayed, or 413 past it
    assert _asgi_call(mw, [b"1234", b"5678"], [])[0] == 200 and seen["body"] == b"12345678"
    assert _asgi_call(mw, [b"123456", b"789012"], [])[0] == 413
    # a body that does not arrive within body_timeout: 408 + close
    status, head, body, _ = _asgi_call(mw, [b"1", b"2", b"3"], cl(3), delay=0.2)
    assert (status, head.get("connection")) == (408, "close") and b"body_timeout" in body
    # the client went away mid-body: still one answer (BentoML's timeout middleware waits for it)
    status, head, body, _ = _asgi_call(mw, [], cl(5))
    assert (status, head.get("connection")) == (400, "close") and b"closed the connection" in body
    assert mw.buffered == 0 and mw.in_flight == 0          # nothing leaks, whatever the outcome
    # the bytes of all bodies held at once stay under max_buffered_bytes
    mw.buffered = 95
    assert _asgi_call(mw, [b"1234567890"], cl(10))[0] == 503
    mw.buffered = 0
    # the processing slots are taken only after the body arrived, and refused with 429 when full
    mw.in_flight = 2
    status, head, body, _ = _asgi_call(mw, [b"12"], cl(2))
    assert status == 429 and "connection" not in head and b"max_concurrency" in body
    mw.in_flight = 0
    status, _, body, _ = _asgi_call(mw, [b"1"], [(b"content-length", b"abc")])
    assert status == 400 and b"Content-Length" in body


# ------------------------------------------------------------------------------ settings: one parser
def test_settings_one_parser_for_config_and_environment(make_config, export):
    from pipeline import serve
    from serving.settings import SettingsError, from_values, load_settings, to_environ

    cfg = make_config("serve.port=3999", "serve.max_body_mb=2.5", "serve.top_k=2")
    typed = serve.serve_settings(cfg)                      # the config's values, through the server's parser
    assert typed.port == 3999 and typed.max_body_mb == 2.5 and typed.body_timeout == 15.0
    back = load_settings(to_environ(typed, export / "model.int8.onnx", "cpu"))
    # (compared as dicts: the service fixture re-imports serving.settings, so the classes may differ)
    assert dataclasses.asdict(back.serve) == dataclasses.asdict(typed)
    with pytest.raises(SettingsError, match=r"serve\.port"):
        from_values({"port": "http"})
    with pytest.raises(SettingsError, match=r"serve\.body_timeout .* below serve\.timeout"):
        from_values({"body_timeout": 40, "timeout": 30})
    with pytest.raises(SettingsError, match="EDGEPIPE_MAX_ASPECT_RATIO"):
        load_settings({"EDGEPIPE_MAX_ASPECT_RATIO": "0.5"})
    with pytest.raises(SettingsError, match=r"serve\.top_k"):
        from_values({"top_k": True})                       # a bool is not an int here


def test_parse_k_is_strict(service_module):
    m = service_module
    for raw in ("--1", "+-2", "\u00b2", "9" * 5000, "+1", " 1", "1\n", "\u0663", "\uff13", "1_0", "00000", "0x1"):
        with pytest.raises(m.RequestProblem) as e:
            m.parse_k(raw, 3, 5)
        assert e.value.status == 400 and "k must" in e.value.message and len(e.value.message) < 200, raw
    assert [m.parse_k(v, 3, 5) for v in ("1", "0003", 2, None, "", "null")] == [1, 3, 2, 3, 3, 3]


# ------------------------------------------------------------------------------ the guarded decoder
def test_open_image_turns_every_failure_into_bad_image_error():
    from serve_utils import broken_files, mutated_files, odd_good_files

    from pipeline.preprocess import BadImageError, open_image

    for name, data in broken_files().items():
        with pytest.raises(BadImageError) as e:
            open_image(data)
        assert len(str(e.value)) > 20, name
    for name, data in odd_good_files().items():
        assert open_image(data).mode == "RGB", name
    outcomes = {}
    for name, data in mutated_files().items():     # 200 or BadImageError: never anything else
        try:
            outcomes[name] = open_image(data).mode
        except BadImageError:
            outcomes[name] = "refused"
    assert set(outcomes.values()) == {"RGB", "refused"}


def test_decode_bombs_are_refused_before_decoding(monkeypatch):
    from PIL import ImageFile
    from serve_utils import decode_bombs

    from pipeline.preprocess import BadImageError, open_image

    bombs = decode_bombs()
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: loads.append(im.size) or original(im))
    words = {"png_100000x1": "aspect ratio", "png_1000000x1": "aspect ratio", "png_40000000x1": "aspect ratio",
             "png16_6000x6666": "16-bit grayscale image needs ~400 MB", "jpeg_65500x65500": "too large"}
    for name, data in bombs.items():
        with pytest.raises(BadImageError, match=words[name]):
            open_image(data)
    assert loads == []      # no pixel was decoded (reading a PNG's EXIF decodes it all: checked after)
    open_image(encode(photo(), "PNG"))
    assert set(loads) == {photo().size}   # (PNG: once for its EXIF, once more as a no-op)


def test_16bit_and_32bit_conversions_equal_the_float_formula():
    """The lookup table / blockwise paths give exactly the old full-size float64 formula's bytes."""
    from PIL import Image

    from pipeline.preprocess import to_rgb

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    old = np.clip(values.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    new = np.asarray(to_rgb(Image.fromarray(values)))              # uint16 -> mode I;16
    assert np.array_equal(new[..., 0], old) and np.array_equal(new[..., 2], old)
    big = (np.arange(600 * 300, dtype=np.int32).reshape(600, 300) * 7) - 5000   # > 256 rows: several blocks
    old32 = np.clip(big.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(big)))[..., 1], old32)   # int32 -> mode I


def test_decode_slots_bound_concurrent_decodes():
    import threading

    from pipeline.preprocess import DecodeSlots

    slots = DecodeSlots(2)
    entered, release, peak = [], threading.Event(), [0]

    def work():
        with slots.hold():
            entered.append(1)
            peak[0] = max(peak[0], len(entered))
            release.wait(5)
            entered.pop()

    threads = [threading.Thread(target=work) for _ in range(5)]
    for th in threads:
        th.start()
    import time
    time.sleep(0.2)
    assert len(entered) == 2          # three are waiting
    release.set()
    for th in threads:
        th.join(5)
    assert peak[0] == 2 and not entered


def test_bad_images_skip_really_skips(make_config, tmp_path):
    """One hostile file per kind in data.root: bad_images=skip leaves them out, fail names them."""
    from conftest import make_imagefolder
    from serve_utils import png_bytes, tiff_broken_tag, webp_broken_exif

    from pipeline.data import DataError, prepare_data

    root = make_imagefolder(tmp_path / "data", per_class=6, size=24)
    hostile = {"circle/broken_exif.webp": webp_broken_exif(), "square/broken_tag.tiff": tiff_broken_tag(),
               "stripes/strip_40000000x1.png": png_bytes(40_000_000, 1)}
    for rel, data in hostile.items():
        (root / rel).write_bytes(data)
    info = prepare_data(make_config("data.bad_images=skip", run_dir=tmp_path / "run_skip", data_root=root))
    assert sorted(Path(p).name for p in info.skipped) == ["broken_exif.webp", "broken_tag.tiff", "strip_40000000x1.png"]
    used = {Path(p).name for split in (info.train, info.val, info.test) for p, _ in split}
    assert len(used) == 18 and not used & {"broken_exif.webp", "broken_tag.tiff", "strip_40000000x1.png"}
    with pytest.raises(DataError, match="3 unreadable") as e:
        prepare_data(make_config("data.bad_images=fail", run_dir=tmp_path / "run_fail", data_root=root))
    assert "struct" in str(e.value) or "error" in str(e.value)


# ------------------------------------------------------------------------------ model files, readiness
def test_model_sha256_checked_against_model_json(export, tmp_path):
    import shutil

    from serving.model_files import ModelIntegrityError, sha256_file, verify_model_file

    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    model, card_path = folder / "model.int8.onnx", folder / "model.json"
    assert "no `sha256`" in verify_model_file(model, card_path)        # older exports: served, logged
    card = json.loads(card_path.read_text())
    card["sha256"] = {"model.int8.onnx": sha256_file(model), "model.fp32.onnx": "0" * 64}
    card_path.write_text(json.dumps(card))
    assert "matches" in verify_model_file(model, card_path)
    with pytest.raises(ModelIntegrityError, match="make export"):
        verify_model_file(folder / "model.fp32.onnx", card_path)
    card["sha256"] = {"other.onnx": "0" * 64}
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelIntegrityError, match="no digest"):
        verify_model_file(model, card_path)


def test_readyz_follows_the_model_file(svc, tmp_path):
    from serving.model_files import FileWatch

    copy = tmp_path / "model.onnx"
    copy.write_bytes(svc.model_path.read_bytes())
    saved = svc.watch
    try:
        svc.watch = FileWatch(copy)
        assert svc.__is_ready__()
        copy.write_bytes(copy.read_bytes() + b"x")     # rewritten under the server
        assert not svc.__is_ready__()
        copy.unlink()                                   # deleted
        assert not svc.__is_ready__() and "gone" in svc.watch.problem()
    finally:
        svc.watch = saved
    assert svc.__is_ready__()


# ------------------------------------------------------------------------------ torch-free, Bento files
BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm", "torch_pruning"):
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
"""


def test_service_imports_without_torch_and_bentofile_lists_what_it_imports(export):
    """`import serving.service` with torch & co. refused by a meta_path finder; the repo files it
    loads are exactly the Python files that bentofile.yaml includes."""
    import subprocess
    import yaml

    root = Path(__file__).resolve().parent.parent
    code = BLOCKER + (
        "import json, os, serving.service\n"
        f"root = {str(root)!r}\n"
        "files = sorted(os.path.relpath(m.__file__, root) for m in list(sys.modules.values())\n"
        "               if getattr(m, '__file__', None) and os.path.abspath(m.__file__).startswith(root + os.sep))\n"
        "files = [f for f in files if f.split(os.sep)[0] in ('serving', 'pipeline', 'models')]\n"
        "print(json.dumps(files))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root), "EDGEPIPE_MODEL": str(export)})
    assert out.returncode == 0, out.stderr[-3000:]
    imported = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not any(f.startswith(("models/", "pipeline/config", "pipeline/serve")) for f in imported), imported
    include = yaml.safe_load((root / "bentofile.yaml").read_text())["include"]
    packed = {f for f in include if f.endswith(".py")}
    assert packed == imported, f"bentofile.yaml include list != what serving.service imports: {packed ^ imported}"


def _old_open_image(data):
    """open_image as it was before issue 12 (exif_transpose first, float64 16-bit path): the reference."""
    import io

    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16") or im.mode == "I":
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            rgba = im.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return im.convert("RGB")


def test_preprocessing_is_pixel_identical_to_before(svc):
    """Conversion before transposition, the lookup table, no exif_transpose copy: the same tensors as the
    previous implementation for every odd file and every EXIF orientation in several modes."""
    from PIL import Image

    from pipeline.preprocess import normalize, open_image, preprocess, resize_and_crop
    from serve_utils import odd_good_files

    files = dict(odd_good_files())
    base = photo(size=(37, 23))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files[f"o{orientation}.jpg"] = encode(base, "JPEG", exif=exif)
        files[f"o{orientation}_rgba.png"] = encode(base.convert("RGBA"), "PNG", exif=exif)
        files[f"o{orientation}_16.png"] = encode(Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 250),
                                                 "PNG", exif=exif)
        files[f"o{orientation}_cmyk.jpg"] = encode(base.convert("CMYK"), "JPEG", exif=exif)
    for name, data in files.items():
        if name in ("float.tiff",):   # mode F: unchanged formula, but the reference above has no F branch
            continue
        ref = _old_open_image(data)
        assert np.array_equal(np.asarray(open_image(data)), np.asarray(ref)), name
        assert np.array_equal(preprocess(data, svc.pre), normalize(resize_and_crop(ref, svc.pre), svc.pre)), name
