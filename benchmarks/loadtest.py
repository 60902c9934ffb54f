"""Load test of the BentoML server on loopback, next to raw in-process ONNX Runtime on the same model.

    .venv/bin/python benchmarks/loadtest.py --export runs/default/export            # starts its own server
    .venv/bin/python benchmarks/loadtest.py --url http://127.0.0.1:3000 --export runs/default/export

For each concurrency (default 1, 4, 16) a bounded async httpx client keeps C requests in flight
(POST /classify, multipart `image`, the same JPEG every time) until --requests are done or --seconds
have passed, and reports throughput and p50/p99 latency. The raw baseline is the same model file
in this process: preprocess + session.run per image at batch 1 (what one client alone could do without
the server) and at batch 16 (what the server's adaptive batching could reach at most), measured with
the same threads. Ratio = server throughput / raw batch-1 throughput. Loopback only (the --url host must
be 127.0.0.1 or localhost). Prints a Markdown table; --json writes the numbers.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def test_image(size: int = 500, seed: int = 0) -> bytes:
    """A photo-sized JPEG (size x 0.75*size) with texture, so decoding costs what a real photo costs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = int(size * 0.75), size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 3) % 256, (yy * 5) % 256, ((xx + yy) * 2) % 256], axis=-1).astype(np.float64)
    arr += rng.normal(0, 25, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def raw_ort(model_file: Path, image: bytes, threads: int, seconds: float, batch: int) -> dict:
    """In-process throughput: preprocess every image + session.run, for a bounded time."""
    from pipeline import modelcard, runtime
    from pipeline.preprocess import preprocess

    sess = runtime.make_session(model_file, device="cpu", threads=threads)
    pre = modelcard.read_card_from_session(sess)["preprocessing"]
    name = sess.get_inputs()[0].name
    sess.run(None, {name: np.stack([preprocess(image, pre)] * batch)})  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done == 0:
        x = np.stack([preprocess(image, pre) for _ in range(batch)])
        sess.run(None, {name: x})
        done += batch
    elapsed = time.perf_counter() - t0
    return {"images_per_s": done / elapsed, "images": done, "seconds": elapsed}


async def http_level(url: str, image: bytes, concurrency: int, total: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    issued = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker():
            nonlocal issued
            while issued < total and time.perf_counter() < deadline:
                issued += 1
                t = time.perf_counter()
                try:
                    r = await client.post("/classify", files={"image": ("photo.jpg", image, "image/jpeg")})
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1
                latencies.append(time.perf_counter() - t)
                statuses[code] = statuses.get(code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    lat = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "ok": ok, "statuses": statuses,
            "seconds": elapsed, "rps": ok / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


def batch_histogram(url: str) -> dict:
    """Mean adaptive batch size of /infer from /metrics (sum/count of BentoML's histogram)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("bentoml_service_adaptive_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("bentoml_service_adaptive_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return {"batches": count, "items": total}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, extra_env: dict) -> subprocess.Popen:
    """The same launcher as `python -m pipeline serve` (dies with this process; own process group)."""
    from serving import launcher

    return launcher.launch({"EDGEPIPE_MODEL": str(model), "HF_HUB_OFFLINE": "1", **extra_env}, "127.0.0.1", port,
                           stdout=subprocess.DEVNULL, new_session=True)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 60) -> None:
    from serving import launcher

    launcher.wait_ready(url, proc, timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", default="runs/default/export", help="export folder (model.json) or model file")
    ap.add_argument("--variant", default="auto", choices=["auto", "int8", "fp32"])
    ap.add_argument("--url", default=None, help="a running server on loopback (default: start one)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=300, help="max requests per concurrency level")
    ap.add_argument("--seconds", type=float, default=20, help="max seconds per concurrency level")
    ap.add_argument("--raw-seconds", type=float, default=8)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (server and raw)")
    ap.add_argument("--image-size", type=int, default=500)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from serving.model_files import resolve_model

    model, info = resolve_model(args.export, args.variant, "cpu")
    image = test_image(args.image_size)
    levels = [int(c) for c in args.concurrency.split(",")]
    proc = None
    if args.url:
        host = urlparse(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            ap.error("the load test runs on loopback only (--url http://127.0.0.1:PORT)")
        url = args.url.rstrip("/")
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(model, port, {"EDGEPIPE_THREADS": str(args.threads)})
    try:
        wait_ready(url, proc)
        print(f"model {model} ({info['variant']}), image {len(image) // 1024} KB JPEG, server {url}", flush=True)
        raw1 = raw_ort(model, image, args.threads, args.raw_seconds, batch=1)
        raw16 = raw_ort(model, image, args.threads, args.raw_seconds, batch=16)
        rows = []
        for c in levels:
            before = batch_histogram(url)
            r = asyncio.run(http_level(url, image, c, args.requests, args.seconds))
            after = batch_histogram(url)
            n = after["batches"] - before["batches"]
            r["mean_batch"] = (after["items"] - before["items"]) / n if n else 0.0
            r["ratio_vs_raw_b1"] = r["rps"] / raw1["images_per_s"]
            rows.append(r)
            print(f"  c={c}: {r['rps']:.1f} req/s p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms "
                  f"statuses {r['statuses']} mean batch {r['mean_batch']:.2f}", flush=True)
    finally:
        if proc is not None:
            from serving import launcher

            launcher.stop(proc)
    print()
    print(f"Raw in-process ORT (preprocess + run, same file and threads): batch 1 "
          f"{raw1['images_per_s']:.1f} img/s, batch 16 {raw16['images_per_s']:.1f} img/s")
    print()
    print("| concurrency | requests | ok | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch | server / raw b1 | server / raw b16 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['ok']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['mean_batch']:.2f} | {r['ratio_vs_raw_b1']:.2f} | "
              f"{r['rps'] / raw16['images_per_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model), "variant": info["variant"], "raw_b1": raw1,
                                               "raw_b16": raw16, "levels": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
