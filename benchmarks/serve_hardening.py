"""Serving under hostile input, slow clients and load (issue 12): prints the measured figures.

    .venv/bin/python benchmarks/serve_hardening.py                        # tiny 224-px model built here
    .venv/bin/python benchmarks/serve_hardening.py --export runs/default/export --load-seconds 60

Loopback only; every loop is bounded in count and time. Steps (each prints one line, then a table):
1. memory: the worker's RSS before / peak / after the hostile corpus of tests/serve_utils.py (three
   rounds), four copies of each decode bomb at once, and eight 24 MP JPEGs at once (legit but big);
2. 413: a 1 GB Content-Length with `Expect: 100-continue`: time to the answer, 100 Continue or not;
3. slow sockets: --slow sockets (default 96, more than serve.max_concurrency = 64) each trickling
   1 byte every 2 s, while 10 normal requests run one after another: their status and latency, then
   what the slow ones got (408 after serve.body_timeout);
4. load: concurrency 32 for --load-seconds (default 60) with a 500-px JPEG (benchmarks/loadtest.py);
5. kill -9 of the process group of `python -m pipeline serve`: seconds until the port is closed and
   no server process is left.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def worker_process(proc):
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        if "_bentoml_impl.worker" in " ".join(child.cmdline()):
            return child
    raise RuntimeError("no BentoML worker process found")


class RssSampler:
    """Peak RSS of a process, sampled every 10 ms in a thread."""

    def __init__(self, process):
        self.process, self.peak, self._stop = process, process.memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def big_jpeg(width: int = 6000, height: int = 4000) -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([(xx // 7) % 256, (yy // 5) % 256, ((xx + yy) // 9) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def memory_step(url: str, worker, image: bytes) -> dict:
    import httpx
    from serve_utils import decode_bombs, file_part, free_port, hostile_requests

    statuses, errors = {}, 0

    def post(kwargs):
        nonlocal errors
        try:
            r = httpx.post(url + "/classify", timeout=60, **kwargs)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        except httpx.HTTPError:
            errors += 1

    for _ in range(20):   # warm-up: allocator pools, ORT arenas, thread stacks
        post(file_part("w.jpg", image, "image/jpeg"))
    before = worker.memory_info().rss
    cases = hostile_requests(free_port())
    with RssSampler(worker) as sampler:
        for _ in range(3):
            for _, kwargs, _ in cases:
                post(kwargs)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(post, [file_part(n, d) for n, d in decode_bombs().items() for _ in range(4)]))
        corpus_peak = sampler.peak
        big = big_jpeg()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(post, [file_part("big.jpg", big, "image/jpeg")] * 8))
    after = worker.memory_info().rss
    return {"requests": sum(statuses.values()) + errors, "corpus_cases": len(cases), "statuses": statuses,
            "transport_errors": errors, "rss_before_mb": before / 1e6, "rss_peak_corpus_mb": corpus_peak / 1e6,
            "rss_peak_with_24mp_mb": sampler.peak / 1e6, "rss_after_mb": after / 1e6,
            "growth_mb": (after - before) / 1e6, "big_jpeg_kb": len(big) // 1024}


def expect_413_step(port: int) -> dict:
    head = (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000000000\r\n"
            b"Expect: 100-continue\r\n\r\n")
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        first = time.perf_counter() - started
    return {"status_line": data.split(b"\r\n", 1)[0].decode(), "seconds": first,
            "sent_100_continue": b"100 Continue" in data, "connection_close": b"connection: close" in data.lower()}


def slow_sockets_step(url: str, port: int, n_slow: int, image: bytes, body_timeout: float) -> dict:
    import httpx
    from serve_utils import file_part

    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    slow = [socket.create_connection(("127.0.0.1", port), timeout=body_timeout + 10) for _ in range(n_slow)]
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            for s in slow:
                try:
                    s.sendall(b"\0")
                except OSError:
                    pass
            stop.wait(2.0)

    for s in slow:
        s.sendall(head)
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    time.sleep(1.0)
    normal = []
    for _ in range(10):
        t = time.perf_counter()
        r = httpx.post(url + "/classify", timeout=30, **file_part("a.jpg", image, "image/jpeg"))
        normal.append((r.status_code, time.perf_counter() - t))
    slow_status = {}
    for s in slow:   # each slow socket's own answer (408 once serve.body_timeout has passed)
        try:
            line = s.recv(200).split(b"\r\n", 1)[0].decode() or "closed"
        except OSError as e:
            line = type(e).__name__
        slow_status[line] = slow_status.get(line, 0) + 1
    stop.set()
    thread.join()
    for s in slow:
        s.close()
    return {"slow_sockets": n_slow, "normal_statuses": [c for c, _ in normal],
            "normal_max_s": max(t for _, t in normal), "normal_median_s": float(np.median([t for _, t in normal])),
            "slow_answers": slow_status}


def kill9_step(export: Path, tmp: Path) -> dict:
    import psutil
    from serve_utils import free_port

    from serving.launcher import wait_ready

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", f"serve.model={export}", f"serve.port={port}",
                             f"run.dir={tmp / 'run'}", "run.device=cpu"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    wait_ready(f"http://127.0.0.1:{port}", proc, timeout=90)
    tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    started = time.perf_counter()
    os.killpg(proc.pid, signal.SIGKILL)
    port_closed = gone = None
    while time.perf_counter() - started < 10 and (port_closed is None or gone is None):
        with socket.socket() as s:
            if port_closed is None and s.connect_ex(("127.0.0.1", port)) != 0:
                port_closed = time.perf_counter() - started
        alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if gone is None and not alive:
            gone = time.perf_counter() - started
        time.sleep(0.02)
    proc.wait(10)
    return {"processes": len(tree) + 1, "port_closed_s": port_closed, "all_gone_s": gone}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", default=None, help="export folder (default: a tiny 224-px model built here)")
    ap.add_argument("--slow", type=int, default=96)
    ap.add_argument("--load-seconds", type=float, default=60)
    ap.add_argument("--load-concurrency", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from loadtest import http_level, test_image
    from serve_utils import make_tiny_export, running_server

    from serving.settings import ServeSettings

    tmp = Path(tempfile.mkdtemp(prefix="serve_hardening_"))
    export = Path(args.export) if args.export else make_tiny_export(tmp / "export", size=224)
    image = test_image(500)
    body_timeout = ServeSettings().body_timeout
    results = {}
    with running_server(export, tmp, threads=0) as srv:
        worker = worker_process(srv["proc"])
        results["memory"] = memory_step(srv["url"], worker, image)
        print("memory:", json.dumps(results["memory"]), flush=True)
        results["expect_413"] = expect_413_step(srv["port"])
        print("413:", json.dumps(results["expect_413"]), flush=True)
        results["slow"] = slow_sockets_step(srv["url"], srv["port"], args.slow, image, body_timeout)
        print("slow sockets:", json.dumps(results["slow"]), flush=True)
        results["load"] = asyncio.run(http_level(srv["url"], image, args.load_concurrency, 10**7, args.load_seconds))
        print("load:", json.dumps(results["load"]), flush=True)
    results["kill9"] = kill9_step(export, tmp)
    print("kill -9:", json.dumps(results["kill9"]), flush=True)
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def print_table(r: dict, args) -> None:
    m, e, s, load, k = r["memory"], r["expect_413"], r["slow"], r["load"], r["kill9"]
    fivexx = sum(v for code, v in m["statuses"].items() if int(code) >= 500)
    print()
    print("| check | result |")
    print("|---|---|")
    print(f"| hostile corpus ({m['corpus_cases']} cases x 3, 4 x each bomb, 8 x 24 MP JPEG at once) | "
          f"{m['requests']} requests, {fivexx} x 5xx, {m['transport_errors']} transport errors, statuses {m['statuses']} |")
    print(f"| worker RSS before / peak (corpus) / peak (24 MP) / after | {m['rss_before_mb']:.0f} / "
          f"{m['rss_peak_corpus_mb']:.0f} / {m['rss_peak_with_24mp_mb']:.0f} / {m['rss_after_mb']:.0f} MB "
          f"(growth {m['growth_mb']:+.0f} MB) |")
    print(f"| 1 GB Content-Length + Expect: 100-continue | {e['status_line']} in {e['seconds'] * 1000:.0f} ms, "
          f"100 Continue sent: {e['sent_100_continue']}, Connection: close: {e['connection_close']} |")
    print(f"| {s['slow_sockets']} slow sockets (1 byte / 2 s) + 10 normal requests | normal: {s['normal_statuses']}, "
          f"max {s['normal_max_s']:.2f} s, median {s['normal_median_s']:.2f} s; slow ones got {s['slow_answers']} |")
    print(f"| load: concurrency {load['concurrency']} for {load['seconds']:.0f} s | {load['rps']:.1f} req/s, "
          f"p50 {load['p50_ms']:.0f} ms, p99 {load['p99_ms']:.0f} ms, statuses {load['statuses']} |")
    print(f"| kill -9 of the `python -m pipeline serve` group ({k['processes']} processes) | port closed after "
          f"{_seconds(k['port_closed_s'])}, all processes gone after {_seconds(k['all_gone_s'])} |")


def _seconds(value) -> str:
    return "more than 10 s (never, within the check)" if value is None else f"{value:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
