"""Unit tests of the serve stage in-process: model resolution, settings, the service class, the parser."""
from __future__ import annotations

import asyncio
import importlib
import json
import sys

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
    from pipeline.config import ConfigError
    from pipeline.serve import resolve_model

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
    with pytest.raises(ConfigError):
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
    with pytest.raises(SettingsError, match="max_batch_size"):
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


def test_body_limit_middleware(service_module):
    m = service_module
    seen = {}

    async def app(scope, receive, send):
        msg = await receive()
        seen["body"] = msg["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(chunks, content_length):
        mw = m.BodyLimitMiddleware(app, max_bytes=10)
        queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        sent = []

        async def receive():
            return queue.pop(0) if queue else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        headers = [(b"content-length", str(content_length).encode())] if content_length is not None else []
        asyncio.run(mw({"type": "http", "method": "POST", "path": "/classify", "headers": headers}, receive, send))
        return sent[0]["status"], b"".join(s.get("body", b"") for s in sent[1:])

    assert call([b"12345"], 5) == (200, b"ok")
    status, body = call([b"x" * 11], 11)
    assert status == 413 and b"max_body_mb" in body
    seen.clear()
    assert call([b"1234", b"5678"], None)[0] == 200 and seen["body"] == b"12345678"   # chunked, replayed
    assert call([b"123456", b"789012"], None)[0] == 413                               # chunked, over the limit
