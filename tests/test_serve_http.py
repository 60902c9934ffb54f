"""Integration: a real `bentoml serve` subprocess on a free loopback port, real HTTP, stopped by its PID.

One server for the whole module (started once, ~5 s); every request below must leave it up.
Hostile input, slow clients, the BentoML client and process lifetime: tests/test_serve_hostile.py.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import httpx
import numpy as np
import pytest

from serve_utils import bad_inputs, encode, make_tiny_export, odd_images, offline_probs, photo, running_server

MAX_BODY_MB = 1.0
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_http")
    export = make_tiny_export(tmp / "export")
    with running_server(export, tmp, max_body_mb=MAX_BODY_MB, max_pixels=MAX_PIXELS) as srv:
        yield srv


def _alive(server):
    assert server["proc"].poll() is None
    assert httpx.get(server["url"] + "/livez", timeout=5).status_code == 200
    assert httpx.get(server["url"] + "/readyz", timeout=5).status_code == 200


def _post(server, **kw):
    return httpx.post(server["url"] + "/classify", timeout=30, **kw)


def test_health_metrics_and_card(server):
    _alive(server)
    r = httpx.get(server["url"] + "/metrics", timeout=5)
    assert r.status_code == 200 and "bentoml_service_request" in r.text
    card = httpx.post(server["url"] + "/model_card", timeout=5).json()
    assert card["labels"] == ["circle", "square", "stripes"]
    assert card["preprocessing"]["input_size"] == [3, 32, 32]
    assert card["serving"]["variant"] == "int8" and card["serving"]["file"] == "model.int8.onnx"


def test_predictions_equal_offline_onnx(server):
    images = odd_images()
    names = sorted(images)
    expected = offline_probs(server["export"] / "model.int8.onnx", [images[n] for n in names])
    for name, want in zip(names, expected):
        r = _post(server, files={"image": (name, images[name], "application/octet-stream")}, data={"k": "3"})
        assert r.status_code == 200, (name, r.text)
        preds = r.json()["predictions"]
        assert len(preds) == 3
        got = np.zeros(3)
        for p in preds:
            got[p["index"]] = p["probability"]
            assert p["label"] == ["circle", "square", "stripes"][p["index"]]
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
        assert preds[0]["index"] == int(np.argmax(want))


def test_raw_body_and_query_k(server):
    data = odd_images()["rgb.jpg"]
    r = _post(server, content=data, headers={"Content-Type": "image/jpeg"}, params={"k": 1})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    r = _post(server, files={"image": ("a.jpg", data, "image/jpeg")})  # default k = min(top_k, classes)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3


def _assert_4xx(r, status, *words):
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    for w in words:
        assert w.lower() in body["error"].lower(), body["error"]


def test_bad_files_get_400(server):
    words = {"empty.jpg": "empty", "text.jpg": "not an image", "truncated.jpg": "truncated",
             "pdf.pdf": "not an image", "bomb.png": "pixels"}
    for name, data in bad_inputs().items():
        r = _post(server, files={"image": (name, data, "application/octet-stream")})
        _assert_4xx(r, 400, words[name])
    _alive(server)


def test_bad_requests_get_4xx(server):
    ok = odd_images()["rgb.jpg"]
    # missing field / wrong field name
    _assert_4xx(_post(server, files={"photo": ("a.jpg", ok, "image/jpeg")}), 400, "missing", "image")
    # a text value (URL or server path) where the file is expected: never fetched or opened
    _assert_4xx(_post(server, data={"image": "http://127.0.0.1:1/x.jpg"}, files={"other": ("x", b"x")}), 400,
                "file upload")
    _assert_4xx(_post(server, data={"image": "/etc/passwd"}, files={"other": ("x", b"x")}), 400, "file upload")
    # JSON body where a file is expected (STACK-NOTES: a PIL.Image parameter gave a 500 here)
    _assert_4xx(_post(server, json={"image": "/etc/passwd"}), 415, "json")
    _assert_4xx(_post(server, json="aGVsbG8="), 415, "json")
    # no / odd content type, empty body
    _assert_4xx(_post(server, content=b""), 415, "content-type")
    _assert_4xx(_post(server, content=b"", headers={"Content-Type": "image/png"}), 400, "empty")
    _assert_4xx(_post(server, content=b"k=3", headers={"Content-Type": "application/x-www-form-urlencoded"}),
                400, "file upload", "multipart")
    # malformed multipart
    _assert_4xx(_post(server, content=b"--xx\r\ngarbage",
                      headers={"Content-Type": "multipart/form-data; boundary=xx"}), 400, "multipart")
    # wrong k
    for k in ("0", "4", "-1", "abc", "2.5", "1e9"):
        _assert_4xx(_post(server, files={"image": ("a.jpg", ok, "image/jpeg")}, data={"k": k}), 400, "k must")
    _assert_4xx(_post(server, files={"image": ("a.jpg", ok, "image/jpeg")}, params={"k": "99"}), 400, "1..3")
    # wrong method
    assert httpx.get(server["url"] + "/classify", timeout=5).status_code == 405
    _alive(server)


def test_body_over_limit_gets_413(server):
    big = os.urandom(int(MAX_BODY_MB * 1e6) + 1000)
    _assert_4xx(_post(server, files={"image": ("big.jpg", big, "image/jpeg")}), 413, "max_body_mb")

    def chunks():   # chunked transfer (no Content-Length): buffered up to the limit, then refused
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    _assert_4xx(_post(server, content=chunks(), headers={"Content-Type": "image/jpeg"}), 413, "max_body_mb")
    # a real but large photo just over the limit as a raw body
    _assert_4xx(_post(server, content=big, headers={"Content-Type": "image/jpeg"}), 413)
    _alive(server)


def test_concurrent_clients_are_batched_and_consistent(server):
    images = [encode(photo(seed=s), "PNG") for s in range(12)]
    expected = offline_probs(server["export"] / "model.int8.onnx", images)

    def batches():
        total = count = 0.0
        for line in httpx.get(server["url"] + "/metrics", timeout=5).text.splitlines():
            if line.startswith("bentoml_service_adaptive_batch_size_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("bentoml_service_adaptive_batch_size_count"):
                count += float(line.rsplit(" ", 1)[1])
        return total, count

    async def go():
        async with httpx.AsyncClient(base_url=server["url"], timeout=30) as client:
            rs = await asyncio.gather(*(client.post("/classify", files={"image": (f"{i}.png", im, "image/png")},
                                                    data={"k": "3"}) for i, im in enumerate(images * 3)))
            return rs

    before = batches()
    rs = asyncio.run(go())
    after = batches()
    for i, r in enumerate(rs):
        assert r.status_code == 200, r.text
        got = np.zeros(3)
        for p in r.json()["predictions"]:
            got[p["index"]] = p["probability"]
        np.testing.assert_allclose(got, expected[i % len(images)], atol=1e-5)
    items, n_batches = after[0] - before[0], after[1] - before[1]
    assert items == len(rs)
    assert n_batches < len(rs), "36 concurrent requests were never batched together"
    _alive(server)


def test_stop_by_pid_stops_worker(server, tmp_path):
    """Last test: SIGTERM to the process group ends bentoml serve and its worker (port closed)."""
    proc = server["proc"]
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(20)
    port = int(server["url"].rsplit(":", 1)[1])
    deadline = time.time() + 10
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.2)
    else:
        pytest.fail("port still open after stopping the server")
