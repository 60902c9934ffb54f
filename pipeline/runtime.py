"""ONNX Runtime sessions the same way everywhere: export checks, latency, predictor and server.

Needs only onnxruntime (no torch). CUDA is requested only when it really works: onnxruntime-gpu on
a machine without a usable GPU would otherwise print an error-level log about missing CUDA
libraries for every session and silently fall back to the CPU. And a session that asked for CUDA is
checked after creation (`session.get_providers()`): ORT falls back to the CPU without raising when
the CUDA provider fails to load (a missing libcublasLt/libcudnn, a driver too old for the wheel).
"""
from __future__ import annotations

import functools
import os
import time
import warnings

import numpy as np

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# The smallest useful ONNX model (one Relu on a float vector, IR 7, opset 13): a session over it shows whether
# the CUDA provider loads, without onnx (not a serving dependency) and without any model file.
_PROBE_MODEL = (b'\x08\x07\x12\x08edgepipe:9\n\x0c\n\x01x\x12\x01y"\x04Relu\x12\x05probeZ\x10\n\x01x\x12\x0b\n\t'
                b'\x08\x01\x12\x05\n\x03\x12\x01nb\x10\n\x01y\x12\x0b\n\t\x08\x01\x12\x05\n\x03\x12\x01nB\x04\n\x00\x10\r')

_cuda_failed = False   # set when a session asked for CUDA (device auto) and got the CPU: stop asking
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def ort_builds_installed() -> list[str]:
    """Which ONNX Runtime distributions are installed: 'onnxruntime' (CPU), 'onnxruntime-gpu', or both."""
    from importlib import metadata

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.distribution(name)
            found.append(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def check_single_ort_build() -> str | None:
    """A message when both onnxruntime and onnxruntime-gpu are installed, else None.

    Both install the same `onnxruntime` package folder; whichever was installed last overwrote part of the
    other, so the build in use is whatever mix remains. pyproject's extras `cpu` and `gpu` never ask for both.
    """
    if len(ort_builds_installed()) > 1:
        return ("both onnxruntime and onnxruntime-gpu are installed; they share one folder and overwrite each "
                "other. Keep one: `pip uninstall -y onnxruntime onnxruntime-gpu` then "
                "`pip install -e '.[gpu]'` (GPU) or `pip install -e '.[cpu]'` (CPU), or `make install GPU=1|0`")
    return None


def _driver_sees_gpu() -> bool:
    """Cheapest reliable probe: does the CUDA driver see a device?"""
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return False
        return count.value > 0
    except OSError:
        return False


def _preload_cuda_libraries(ort) -> None:
    """onnxruntime-gpu's wheels find the CUDA/cuDNN libraries of the nvidia-* PyPI packages (its [cuda,cudnn]
    extras, or torch's) only after preload_dlls(); without torch imported first they are not on the loader path."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # noqa: BLE001 - best effort: system CUDA libraries may still be found
            pass


def cuda_provider_options(device_id: int = 0, conv_algo_search: str = "HEURISTIC",
                          gpu_mem_limit: int | None = None) -> dict:
    """CUDA provider options for a server with adaptive batching.

    - cudnn_conv_algo_search HEURISTIC: the default, EXHAUSTIVE, benchmarks every cuDNN algorithm for each new
      input shape, and adaptive batching makes a new shape for every batch size it forms: a stall of up to
      seconds the first time each size appears. HEURISTIC asks cuDNN's heuristics (near the best, no timing).
    - arena_extend_strategy kSameAsRequested: the default grows the memory arena in powers of two, which with
      varying batch shapes reserves far more GPU memory than the model needs.
    - gpu_mem_limit: optional cap in bytes for the arena (several workers on one GPU).
    """
    if conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        raise ValueError(f"cudnn_conv_algo_search must be EXHAUSTIVE, HEURISTIC or DEFAULT, got {conv_algo_search!r}")
    options = {"device_id": str(int(device_id)), "cudnn_conv_algo_search": conv_algo_search,
               "arena_extend_strategy": "kSameAsRequested", "do_copy_in_default_stream": "1"}
    if gpu_mem_limit:
        options["gpu_mem_limit"] = str(int(gpu_mem_limit))
    return options


@functools.lru_cache(maxsize=1)
def _cuda_probe() -> bool:
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if not _driver_sees_gpu():
        return False
    message = check_single_ort_build()
    if message:
        _warn_once(message)
    _preload_cuda_libraries(ort)
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(_PROBE_MODEL, sess_options=so,
                                    providers=[(CUDA, cuda_provider_options()), CPU])
    except Exception:  # noqa: BLE001 - any failure means: not usable
        return False
    return CUDA in sess.get_providers()


def cuda_usable() -> bool:
    """True when onnxruntime has the CUDA provider, the driver sees a GPU, AND a CUDA session really runs on it."""
    return not _cuda_failed and _cuda_probe()


def _cuda_device_id(device: str) -> int:
    """'cuda' -> 0, 'cuda:1' -> 1 (an index among the GPUs this process sees)."""
    _, _, index = device.partition(":")
    try:
        return int(index) if index else 0
    except ValueError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None


def providers_for(device: str = "auto", cuda_options: dict | None = None) -> list:
    """'auto' -> CUDA (with cuda_provider_options) then CPU when CUDA works, else CPU only; 'cpu';
    'cuda' / 'cuda:N' (fails if unusable)."""
    device = (device or "auto").strip().lower()
    if device == "cpu":
        return [CPU]
    if device.startswith("cuda"):
        options = cuda_options or cuda_provider_options(_cuda_device_id(device))
        if not cuda_usable():
            raise RuntimeError("device 'cuda' was asked for, but onnxruntime cannot use a GPU here "
                               "(install onnxruntime-gpu and the CUDA libraries, or use device=cpu)")
        return [(CUDA, options), CPU]
    if device != "auto":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return [(CUDA, cuda_options or cuda_provider_options()), CPU] if cuda_usable() else [CPU]


def make_session(path, device: str = "auto", threads: int = 0, cuda_options: dict | None = None):
    """An InferenceSession with sane defaults for a shared, small CPU box.

    - intra-op spinning off: several sessions in one process on 2 cores ran 2-3.6x slower with
      spinning worker threads (STACK-NOTES);
    - log severity 3 (errors only) so a CPU-only machine does not print provider warnings;
    - CUDA: provider options for adaptive batching (cuda_provider_options), and a check that the session
      really got the CUDA provider: device=cuda raises when ORT fell back to the CPU; device=auto warns
      once and stops asking for CUDA in this process.
    """
    global _cuda_failed
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads and threads > 0:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Runtime-style .ort files (the phone files, pipeline/mobile.py) store CPU fusions that are only replayed with
    # this on; without it a fixed-shape int8 .ort flipped 1 of 48 top-1s against its .onnx. Our own files only.
    so.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    providers = providers_for(device, cuda_options)
    sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    if isinstance(providers[0], tuple) and CUDA not in sess.get_providers():
        message = (f"onnxruntime fell back to {sess.get_providers()} for {path}: the CUDA provider did not load "
                   f"(CUDA/cuDNN libraries that onnxruntime {ort.__version__} needs, or the driver)")
        if (device or "").strip().lower().startswith("cuda"):
            raise RuntimeError(f"device={device}: {message}; fix the CUDA setup or use device=cpu")
        _cuda_failed = True
        _warn_once(message + "; serving on the CPU")
    return sess


def session_device(session) -> str:
    """'cuda' when the session runs on the CUDA provider, else 'cpu'."""
    return "cuda" if CUDA in session.get_providers() else "cpu"


def warm_up_sizes(max_batch_size: int, on_cuda: bool) -> list[int]:
    """Batch sizes worth running once before serving. BentoML's adaptive batching forms any size from 1 to
    max_batch_size; on CUDA each new shape costs setup (cuDNN algorithm choice, arena growth) the first time,
    so all of them; on the CPU the cost is small, so 1, 2 (checks the dynamic batch axis) and the largest."""
    max_batch_size = max(1, int(max_batch_size))
    if on_cuda:
        return list(range(1, max_batch_size + 1))
    return sorted({1, min(2, max_batch_size), max_batch_size})


def warm_up(session, input_shape, max_batch_size: int = 32, sizes=None, dtype=np.float32) -> dict[int, float]:
    """Run the session once per batch size on zeros (input_shape without the batch axis, e.g. (3, 224, 224)).
    -> {batch size: first-run milliseconds}. For the server to call at start-up, before it reports ready."""
    name = session.get_inputs()[0].name
    sizes = sizes if sizes is not None else warm_up_sizes(max_batch_size, session_device(session) == "cuda")
    timings = {}
    for n in sizes:
        t = time.perf_counter()
        session.run(None, {name: np.zeros((int(n), *input_shape), dtype=dtype)})
        timings[int(n)] = (time.perf_counter() - t) * 1000.0
    return timings


def measure_latency_ms(session, batch: np.ndarray, runs: int = 30, warmup: int = 3) -> float:
    """Median wall time in ms of one session.run on `batch`."""
    name = session.get_inputs()[0].name
    for _ in range(warmup):
        session.run(None, {name: batch})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {name: batch})
        times.append((time.perf_counter() - t) * 1000.0)
    return float(np.median(times))


def compare_cuda_cpu(paths: dict, batch: np.ndarray, runs: int = 20, threads: int = 0,
                     parity_atol: float = 1e-3, device: str = "cuda") -> dict:
    """{variant: model path} -> per variant: CPU and CUDA latency (median ms on `batch`), max |logit diff|
    CUDA vs CPU, top-1 agreement, and whether the CUDA session really ran on CUDA; plus `recommended`: the
    fastest variant on CUDA whose logits agree with its own CPU run (parity_atol for fp32; int8/fp16 get
    the same top-1 requirement). For export's `recommended.cuda` (today hard-coded to fp32) and
    benchmarks/gpu_check.py. Needs cuda_usable() (device="cpu" compares the CPU with itself: a test of this code)."""
    rows = {}
    for variant, path in paths.items():
        cpu = make_session(path, "cpu", threads)
        gpu = make_session(path, device)
        name = cpu.get_inputs()[0].name
        ref = cpu.run(None, {name: batch})[0]
        out = gpu.run(None, {name: batch})[0]
        rows[variant] = {
            "cpu_ms": measure_latency_ms(cpu, batch, runs),
            "cuda_ms": measure_latency_ms(gpu, batch, runs),
            "max_abs_diff": float(np.abs(out.astype(np.float64) - ref).max()),
            "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
            "on_cuda": session_device(gpu) == "cuda",
        }
    ok = {v: r for v, r in rows.items() if (r["on_cuda"] or device == "cpu") and r["top1_agreement"] >= 0.99
          and (v != "fp32" or r["max_abs_diff"] <= parity_atol)}
    recommended = min(ok, key=lambda v: ok[v]["cuda_ms"]) if ok else None
    return {"variants": rows, "recommended": recommended}
