"""`benchmarks/speed.py --serve`: the HTTP server against raw in-process work on the same image files.

Raw = decode (pipeline.preprocess.open_image) + preprocess (resize_and_crop, normalize) + inference of the same
files in one process, the same model file, runtime and threads, in batches of 1 and of --concurrency. Server =
`bentoml serve` over the file `make serve` serves (model.json `recommended`, its runtime), driven by an async
client keeping --concurrency requests in flight. Each answer's Server-Timing header says where the request spent
its time inside the server; the client's wall time minus their sum is HTTP + framework + client.
"""
from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import modelcard, runtime
from pipeline.preprocess import normalize, open_image, resize_and_crop

STEPS = ("receive", "decode", "preprocess", "queue", "inference", "respond")
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def image_files(folder: str | None, count: int = 48) -> list[bytes]:
    """Up to `count` image files from a folder (every class, sorted), or generated photo-like JPEGs."""
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in SUFFIXES)
        step = max(1, len(files) // count)
        return [p.read_bytes() for p in files[::step][:count]]
    from loadtest import test_image

    return [test_image(400 + 8 * (i % 13), seed=i) for i in range(count)]


def raw_throughput(model_file: Path, rt: str, images: list[bytes], threads: int, batch: int, seconds: float) -> dict:
    """images/s of decode + preprocess + inference in this process; per-image median ms of each step."""
    sess = runtime.make_session(model_file, "cpu", threads, runtime=rt)
    pre = modelcard.read_card_from_session(sess)["preprocessing"]
    name = sess.get_inputs()[0].name
    sess.run(None, {name: np.zeros((batch, *pre["input_size"]), np.float32)})   # warm-up at this shape
    steps: dict = {"decode": [], "preprocess": [], "inference": []}
    done, i, t0, cpu0 = 0, 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds or done == 0:
        xs = []
        for _ in range(batch):
            a = time.perf_counter()
            im = open_image(images[i % len(images)])
            b = time.perf_counter()
            xs.append(normalize(resize_and_crop(im, pre), pre))
            steps["decode"].append(b - a)
            steps["preprocess"].append(time.perf_counter() - b)
            i += 1
        a = time.perf_counter()
        sess.run(None, {name: np.stack(xs)})
        steps["inference"].append((time.perf_counter() - a) / batch)
        done += batch
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"batch": batch, "images": done, "seconds": round(elapsed, 2), "images_per_s": done / elapsed,
            "cpu_per_wall": cpu / elapsed,
            "runtime": runtime.session_runtime(sess),
            "ms_per_image": {k: 1000 * float(np.median(v)) for k, v in steps.items()}}


TIMING = re.compile(r"([a-z]+);dur=([0-9.]+)")


BATCH = re.compile(r'batch;desc="([0-9]+)"')


def parse_server_timing(header: str) -> dict:
    """{step: ms} from a Server-Timing header, plus `batch` (how many requests shared the inference call)."""
    out = {k: float(v) for k, v in TIMING.findall(header or "")}
    m = BATCH.search(header or "")
    if m:
        out["batch"] = int(m.group(1))
    return out


async def _drive(url: str, images: list[bytes], concurrency: int, seconds: float) -> dict:
    import httpx

    records, statuses, issued = [], {}, 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker():
            nonlocal issued
            while time.perf_counter() < deadline:
                data = images[issued % len(images)]
                issued += 1
                t = time.perf_counter()
                r = await client.post("/classify", files={"image": ("photo.jpg", data, "image/jpeg")})
                wall = 1000 * (time.perf_counter() - t)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    records.append({"wall": wall, **parse_server_timing(r.headers.get("server-timing"))})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"records": records, "statuses": statuses, "seconds": elapsed}


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants (the server and its workers)."""
    stats, tick = {}, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()   # after the name: state ppid ... utime stime
        except OSError:
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return sum(stats[pid][1] for pid in tree if pid in stats) / tick


def http_run(url: str, images: list[bytes], concurrency: int, seconds: float, server_pid: int) -> dict:
    """Throughput, wall-time percentiles, the median of each Server-Timing step at one concurrency, and the CPU
    time the server (its process tree) and this client spent per request."""
    asyncio.run(_drive(url, images, concurrency, min(2.0, seconds)))    # warm-up: every batch shape, keep-alive
    cpu0, client0 = tree_cpu_seconds(server_pid), time.process_time()
    got = asyncio.run(_drive(url, images, concurrency, seconds))
    server_cpu, client_cpu = tree_cpu_seconds(server_pid) - cpu0, time.process_time() - client0
    recs = got["records"]
    wall = np.array([r["wall"] for r in recs]) if recs else np.zeros(1)
    parts = {s: float(np.median([r.get(s, 0.0) for r in recs])) if recs else 0.0 for s in STEPS}
    parts["http + framework + client"] = max(0.0, float(np.median(wall)) - sum(parts.values()))
    batches = [r.get("batch", 0) for r in recs]
    n = max(1, len(recs))
    return {"concurrency": concurrency, "ok": len(recs), "statuses": got["statuses"], "seconds": got["seconds"],
            "rps": len(recs) / got["seconds"], "p50_ms": float(np.percentile(wall, 50)),
            "p99_ms": float(np.percentile(wall, 99)), "median_ms": parts, "mean_batch": float(np.mean(batches or [0])),
            "server_cpu_ms_per_request": 1000 * server_cpu / n, "client_cpu_ms_per_request": 1000 * client_cpu / n,
            "cpu_busy_fraction": (server_cpu + client_cpu) / got["seconds"] / (os.cpu_count() or 1)}


def _served(args) -> tuple[Path, dict]:
    from serving.model_files import resolve_model

    return resolve_model(Path(args.run) / "export", "auto", "cpu")   # what `make serve` picks on a CPU


def serve_mode(args) -> dict:
    import httpx
    from loadtest import free_port
    from serving import launcher

    from speed import cpu_info, load_note

    load = os.getloadavg()
    model, info = _served(args)
    if args.runtimes:   # --runtimes X: serve (and run raw) on X instead of the recommended runtime
        info["runtime"] = args.runtimes.split(",")[0]
    images = image_files(args.images)
    print(f"[speed] serving {model.name} ({info['variant']}, runtime {info['runtime']}), {len(images)} image files, "
          f"mean {np.mean([len(b) for b in images]) / 1024:.0f} KB", flush=True)
    raw = {b: raw_throughput(model, info["runtime"], images, args.threads, b, args.seconds / 2)
           for b in (1, args.concurrency)}
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="speed_serve.", suffix=".log")[1])
    with open(log_path, "wb") as log:   # the same launcher (and EDGEPIPE_* settings) as `make serve`
        proc = launcher.launch({"EDGEPIPE_MODEL": str(model), "EDGEPIPE_THREADS": str(args.threads),
                                "EDGEPIPE_RUNTIME": info["runtime"], "HF_HUB_OFFLINE": "1"}, "127.0.0.1", port,
                               stdout=log, new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        launcher.wait_ready(url, proc, timeout=90, log=log_path)
        served = httpx.post(url + "/model_card", timeout=10).json()["serving"]
        levels = {c: http_run(url, images, c, args.seconds, proc.pid) for c in (1, args.concurrency)}
    finally:
        launcher.stop(proc)
    report_serve(raw, levels, served, args.concurrency)
    return {"model": str(model), "variant": info["variant"], "runtime": served.get("runtime"),
            "threads": args.threads, **load_note(load, cpu_info()), "raw": raw, "http": levels}


def report_serve(raw: dict, levels: dict, served: dict, c: int) -> None:
    top = levels[c]
    print(f"\nserver: {served.get('file')} on {served.get('runtime')} ({served.get('providers')})\n")
    print("| path | images/s | vs raw b1 | vs raw b%d |" % c)
    print("|---|---:|---:|---:|")
    for b, r in raw.items():
        print(f"| raw in-process, batch {b} | {r['images_per_s']:.1f} | {r['images_per_s'] / raw[1]['images_per_s']:.2f}x | "
              f"{r['images_per_s'] / raw[c]['images_per_s']:.2f}x |")
    for conc, r in levels.items():
        print(f"| HTTP, concurrency {conc} (p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, mean batch "
              f"{r['mean_batch']:.1f}) | {r['rps']:.1f} | {r['rps'] / raw[1]['images_per_s']:.2f}x | "
              f"{r['rps'] / raw[c]['images_per_s']:.2f}x |")
    print("\nOne request, median ms per step (server: Server-Timing; the rest: client wall time minus the steps):\n")
    names = list(next(iter(levels.values()))["median_ms"])
    print("| step | " + " | ".join(f"HTTP c={conc}" for conc in levels) + " | raw b1 (per image) |")
    print("|---|" + "---:|" * (len(levels) + 1))
    for s in names:
        rawv = raw[1]["ms_per_image"].get(s)
        print(f"| {s} | " + " | ".join(f"{r['median_ms'][s]:.2f}" for r in levels.values())
              + f" | {'' if rawv is None else f'{rawv:.2f}'} |")
    raw_cpu = 1000.0 / raw[c]["images_per_s"] * (raw[c].get("cpu_per_wall") or 1.0)
    for conc, r in levels.items():
        print(f"- concurrency {conc}: CPU per request: server {r['server_cpu_ms_per_request']:.2f} ms, this client "
              f"{r['client_cpu_ms_per_request']:.2f} ms (raw batch {c}: {raw_cpu:.2f} ms per image); both cores "
              f"{100 * r['cpu_busy_fraction']:.0f}% busy with them")
    for conc, r in levels.items():
        step = max(r["median_ms"], key=r["median_ms"].get)
        print(f"- concurrency {conc}: the largest part is **{step}** ({r['median_ms'][step]:.2f} ms of "
              f"{r['p50_ms']:.2f} ms p50)")
