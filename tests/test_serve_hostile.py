"""Hostile and odd input against a real `bentoml serve` subprocess (issue 12): no 5xx, no reset, still up.

One server for the module with the default decode limits (so the real decode bombs meet the real
budget), a small max_concurrency and body_timeout (so slow clients and 408 are quick to show). The
corpus is deterministic (hand-made files plus seeded mutations). Memory growth, 96 slow sockets and
load figures are measured by benchmarks/serve_hardening.py, not asserted here.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve_utils import decode_bombs, encode, file_part, free_port, hostile_requests, make_tiny_export, photo, running_server

REPO = Path(__file__).resolve().parent.parent
MAX_CONCURRENCY = 8
BODY_TIMEOUT = 3
MAX_BODY_MB = 2


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_tiny_export(tmp_path_factory.mktemp("hostile") / "export")


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile_server")
    with running_server(export, tmp, max_body_mb=MAX_BODY_MB, body_timeout=BODY_TIMEOUT,
                        max_concurrency=MAX_CONCURRENCY) as srv:
        yield srv


@pytest.fixture
def listener():
    """A loopback port that records whether anything connected: URLs given as input must never be fetched."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def _connected(sock) -> bool:
    try:
        conn, _ = sock.accept()
        conn.close()
        return True
    except BlockingIOError:
        return False


def _check(name, r, expected, problems):
    ok = {"200": r.status_code == 200, "4xx": 400 <= r.status_code < 500,
          "200|4xx": r.status_code == 200 or 400 <= r.status_code < 500}[expected]
    if not ok:
        problems.append(f"{name}: {r.status_code} (expected {expected}) {r.text[:200]}")
    elif r.status_code >= 400:
        body = r.json()
        if not isinstance(body.get("error"), str) or len(body["error"]) < 10:
            problems.append(f"{name}: {r.status_code} without a clear error message: {r.text[:200]}")


def test_corpus_of_hostile_inputs_gets_no_5xx(server, listener):
    cases = hostile_requests(listener.getsockname()[1])
    assert len(cases) >= 70
    problems, statuses = [], {}
    with httpx.Client(base_url=server["url"], timeout=30) as client:
        for name, kwargs, expected in cases:
            try:
                r = client.post("/classify", **kwargs)
            except httpx.HTTPError as e:      # a reset or a dropped connection is a failure too
                problems.append(f"{name}: transport error {type(e).__name__}: {e}")
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            _check(name, r, expected, problems)
    assert not problems, "\n".join(problems)
    assert not any(s >= 500 for s in statuses), statuses
    assert statuses.get(200, 0) >= 20 and sum(v for s, v in statuses.items() if s >= 400) >= 50, statuses
    assert not _connected(listener), "a URL given as input was fetched"
    assert server["proc"].poll() is None and httpx.get(server["url"] + "/readyz", timeout=5).status_code == 200


def test_decode_bombs_get_400_naming_the_limit(server):
    words = {"png_100000x1": "aspect ratio", "png_1000000x1": "aspect ratio", "png_40000000x1": "aspect ratio",
             "png16_6000x6666": "needs ~400 MB", "jpeg_65500x65500": "too large"}
    for name, data in decode_bombs().items():
        r = httpx.post(server["url"] + "/classify", timeout=30, **file_part(name, data))
        assert r.status_code == 400 and words[name] in r.json()["error"], (name, r.text)


def _raw_request(port: int, head: str, body: bytes = b"", read_for: float = 5.0) -> tuple[bytes, bool]:
    """Send a raw request; return (everything read until the server closed or read_for passed, closed?)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_for) as s:
        s.sendall(head.encode() + body)
        data, deadline = b"", time.time() + read_for
        while time.time() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                return data, True
            data += chunk
        return data, False


def test_oversize_content_length_gets_413_at_once_without_100_continue(server):
    head = ("POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000000000\r\n"
            "Expect: 100-continue\r\n\r\n")
    started = time.time()
    data, closed = _raw_request(server["port"], head)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b"100 Continue" not in data and b"connection: close" in data.lower() and b"max_body_mb" in data
    assert closed and time.time() - started < 3
    # an ordinary client that sends a 25 MB body anyway still reads its 413
    r = httpx.post(server["url"] + "/classify", content=os.urandom(25_000_000), timeout=30,
                   headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413 and "max_body_mb" in r.json()["error"]


def test_body_that_does_not_arrive_gets_408(server):
    head = "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    started = time.time()
    data, closed = _raw_request(server["port"], head, b"\x89PNG", read_for=BODY_TIMEOUT + 5)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"body_timeout" in data and b"connection: close" in data.lower() and closed
    assert BODY_TIMEOUT - 0.5 < time.time() - started < BODY_TIMEOUT + 3


def test_slow_clients_do_not_starve_normal_ones(server):
    """Twice max_concurrency sockets trickling their bodies; normal requests still get 200 within 3 s."""
    head = "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    slow = []
    try:
        for _ in range(2 * MAX_CONCURRENCY):
            s = socket.create_connection(("127.0.0.1", server["port"]), timeout=5)
            s.sendall(head.encode() + b"\x89")
            slow.append(s)
        time.sleep(0.3)
        good = encode(photo(), "JPEG")
        for _ in range(5):
            started = time.time()
            r = httpx.post(server["url"] + "/classify", timeout=10, **file_part("a.jpg", good, "image/jpeg"))
            assert r.status_code == 200 and time.time() - started < 3, (r.status_code, time.time() - started)
            for s in slow:
                s.sendall(b"\0")
    finally:
        for s in slow:
            s.close()


def test_bentoml_client_sync_async_and_pil_equal_the_predictor(server, export, listener, tmp_path):
    import bentoml
    from PIL import Image

    from pipeline.predict import Predictor

    files = []
    for i, fmt in enumerate(("png", "jpg", "webp")):
        files.append(tmp_path / f"photo{i}.{fmt}")
        photo(seed=i).save(files[-1])
    want = Predictor(export / "model.int8.onnx").predict([str(f) for f in files], k=3)
    with bentoml.SyncHTTPClient(server["url"]) as client:
        got = [client.classify(image=f, k=3)["predictions"] for f in files]
        got_pil = client.classify(image=Image.open(files[0]), k=3)["predictions"]
        with pytest.raises(bentoml.exceptions.BentoMLException, match="file upload"):
            client.classify(image=f"http://127.0.0.1:{listener.getsockname()[1]}/x.jpg")
        assert len(client.classify(image=files[0])["predictions"]) == 3     # k omitted: the default

    async def with_async():
        async with bentoml.AsyncHTTPClient(server["url"]) as client:
            return [(await client.classify(image=f, k=3))["predictions"] for f in files]

    got_async = asyncio.run(with_async())
    for answers in (got, got_async, [got_pil] + want[1:]):
        for g, w in zip(answers, want):
            assert [p["index"] for p in g] == [p["index"] for p in w]
            np.testing.assert_allclose([p["probability"] for p in g], [p["probability"] for p in w], atol=1e-6)
    assert not _connected(listener)


def _descendants(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_readyz_and_kill_9_of_the_launcher_group(export, tmp_path):
    """`python -m pipeline serve` in its own process group: /readyz goes 503 when the served file is
    deleted; kill -9 of the group leaves no process and nothing listening within 5 s."""
    from serving.launcher import wait_ready

    served = tmp_path / "export"
    shutil.copytree(export, served)
    port = free_port()
    log = open(tmp_path / "launcher.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", f"serve.model={served}",
                             f"serve.port={port}", f"run.dir={tmp_path / 'run'}", "run.device=cpu"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "BENTOML_HOME": str(tmp_path / "bh")})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, timeout=90, log=tmp_path / "launcher.log")
        tree = _descendants(proc.pid)
        assert len(tree) >= 2, tree          # bentoml serve (the arbiter) and its worker
        (served / "model.int8.onnx").unlink()
        assert httpx.get(url + "/readyz", timeout=5).status_code == 503
        os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.time() + 5
        while time.time() < deadline and (_port_open(port) or any(_alive(p) for p in tree)):
            time.sleep(0.1)
        assert not _port_open(port), "still listening 5 s after kill -9 of the launcher's group"
        assert not [p for p in tree if _alive(p)], "orphaned server processes"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
