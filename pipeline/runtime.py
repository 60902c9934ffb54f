"""ONNX Runtime sessions the same way everywhere: export checks, latency, predictor and server.

Needs only onnxruntime (no torch). CUDA is requested only when it really works: onnxruntime-gpu on
a machine without a usable GPU would otherwise print an error-level log about missing CUDA
libraries for every session and silently fall back to the CPU.
"""
from __future__ import annotations

import functools
import os
import time

import numpy as np


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True when onnxruntime has the CUDA provider AND a CUDA session can actually be created."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    try:  # cheapest reliable probe: does the driver see a device?
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return False
        return count.value > 0
    except OSError:
        return False


def providers_for(device: str = "auto") -> list[str]:
    """'auto' -> CUDA then CPU when CUDA works, else CPU only; 'cpu'; 'cuda' (fails if unusable)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if not cuda_usable():
            raise RuntimeError("device 'cuda' was asked for, but onnxruntime cannot use a GPU here "
                               "(install onnxruntime-gpu and the CUDA libraries, or use device=cpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return (["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_usable()
            else ["CPUExecutionProvider"])


def make_session(path, device: str = "auto", threads: int = 0):
    """An InferenceSession with sane defaults for a shared, small CPU box.

    - intra-op spinning off: several sessions in one process on 2 cores ran 2-3.6x slower with
      spinning worker threads (STACK-NOTES);
    - log severity 3 (errors only) so a CPU-only machine does not print provider warnings.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads and threads > 0:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=providers_for(device))


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
