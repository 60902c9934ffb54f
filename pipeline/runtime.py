"""ONNX Runtime sessions the same way everywhere: export checks, latency, predictor and server.

Needs only onnxruntime (no torch). CUDA is requested only when it really works: onnxruntime-gpu on
a machine without a usable GPU would otherwise print an error-level log about missing CUDA
libraries for every session and silently fall back to the CPU. And a session that asked for CUDA is
checked after creation (`session.get_providers()`): ORT falls back to the CPU without raising when
the CUDA provider fails to load (a missing libcublasLt/libcudnn, a driver too old for the wheel).

One loader for every consumer (export, predictor, server, benchmarks), like Ultralytics' AutoBackend:
`make_session(path, device, threads, runtime="onnxruntime" | "openvino")` returns an object with
onnxruntime.InferenceSession's interface (run, get_inputs, get_outputs, get_providers, get_modelmeta).
runtime="openvino" reads the same .onnx file (fp32 or QDQ int8) with OpenVINO's CPU plugin
(OpenVINOSession); when openvino is not installed, the file is an .ort, or the device is CUDA, it falls
back to ONNX Runtime with one log line. `session_runtime(session)` says which one a session really is.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ONNXRUNTIME, OPENVINO = "onnxruntime", "openvino"
RUNTIMES = (ONNXRUNTIME, OPENVINO)
OPENVINO_CPU = "OpenVINO CPU"   # what an OpenVINOSession lists as its provider
logger = logging.getLogger("edgepipe.runtime")

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


# ----------------------------------------------------------------------------- OpenVINO behind the same interface

def runtime_installed(name: str) -> bool:
    """Whether the Python package of runtime `name` (onnxruntime | openvino) can be imported here."""
    import importlib.util

    if name not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {name!r}")
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:  # noqa: BLE001 - ValueError / AttributeError for a module blocked in sys.modules
        return False


def cpu_runtimes() -> list[str]:
    """The CPU runtimes installed here, onnxruntime first (the reference every other one is checked against)."""
    return [r for r in RUNTIMES if r == ONNXRUNTIME or runtime_installed(r)]


def runtime_version(name: str) -> str | None:
    from importlib import metadata

    for dist in ((name,) if name != ONNXRUNTIME else ("onnxruntime", "onnxruntime-gpu")):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _log_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


class _Arg:
    """What onnxruntime.NodeArg offers that the consumers use: name, shape (dynamic dims as '?'), type."""

    def __init__(self, port):
        self.name = port.any_name
        self.shape = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
        self.type = str(port.get_element_type())


class _ModelMeta:
    def __init__(self, props: dict):
        self.custom_metadata_map = props


@functools.lru_cache(maxsize=1)
def _openvino_core():
    import openvino as ov

    return ov.Core()


def _onnx_metadata(model) -> dict:
    """The ONNX metadata_props (labels, preprocessing, model_card) that OpenVINO's ONNX reader keeps under
    rt_info['framework']."""
    try:
        if not model.has_rt_info(["framework"]):
            return {}
        keys = model.get_rt_info(["framework"]).astype(dict)
        return {k: model.get_rt_info(["framework", k]).astype(str) for k in keys}
    except Exception:  # noqa: BLE001 - no metadata: the caller says what is missing
        return {}


class OpenVINOSession:
    """onnxruntime.InferenceSession's interface over an OpenVINO CompiledModel on the CPU, from the same .onnx file.

    - PERFORMANCE_HINT LATENCY: one stream with all (or `threads`) cores for one call at a time, which is what the
      predictor and the server (one batch at a time) do; THROUGHPUT would split the cores into parallel streams.
    - INFERENCE_PRECISION_HINT f32: on CPUs with AVX512-BF16 or AMX, OpenVINO's default runs the float parts in
      bf16 (EfficientNet-Lite0 fp32 logits moved by 0.09); f32 keeps the fp32 file's answers ONNX Runtime's (~1e-5)
      and cost int8 nothing measurable (docs/speed.md).
    - ENABLE_CPU_PINNING False: pinned and unpinned ran alike on an idle CPU, and unpinned kept up better when other
      work shared the cores (the server's decoding threads, other jobs): batch 32 101-107 ms vs 123-124 ms.
    - one infer request behind a lock: run() may be called from several threads, like InferenceSession.run.
    """

    def __init__(self, path, threads: int = 0, hint: str = "LATENCY"):
        core = _openvino_core()
        model = core.read_model(str(path))
        self.path = str(path)
        self._meta = _ModelMeta(_onnx_metadata(model))
        self.config = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}
        if threads and threads > 0:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", self.config)
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()
        self._inputs = [_Arg(p) for p in self.compiled.inputs]
        self._outputs = [_Arg(p) for p in self.compiled.outputs]

    def run(self, output_names, input_feed: dict, run_options=None) -> list:
        wanted = output_names or [o.name for o in self._outputs]
        index = {o.name: i for i, o in enumerate(self._outputs)}
        with self._lock:
            result = self._request.infer({k: np.ascontiguousarray(v) for k, v in input_feed.items()})
            return [np.array(result[self.compiled.outputs[index[name]]]) for name in wanted]

    def get_inputs(self) -> list:
        return list(self._inputs)

    def get_outputs(self) -> list:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [OPENVINO_CPU]

    def get_modelmeta(self) -> _ModelMeta:
        return self._meta


def _openvino_usable(path, device: str, runtime: str) -> bool:
    """runtime=openvino asked for: True when it can serve `path` here, else False after one log line."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == ONNXRUNTIME:
        return False
    why = None
    if (device or "auto").strip().lower().startswith("cuda"):
        why = f"device={device}: OpenVINO runs on the CPU here"
    elif str(path).endswith(".ort"):
        why = f"{Path(path).name} is an ORT-format file, which only ONNX Runtime reads"
    elif not runtime_installed(OPENVINO):
        why = "openvino is not installed (pip install openvino, or make install OPENVINO=1)"
    if why:
        _log_once(f"{why}: using onnxruntime for {Path(path).name} (same file, same preprocessing)")
        return False
    return True


def session_runtime(session) -> str:
    """'openvino' for an OpenVINOSession, else 'onnxruntime'."""
    return OPENVINO if isinstance(session, OpenVINOSession) else ONNXRUNTIME


def make_session(path, device: str = "auto", threads: int = 0, cuda_options: dict | None = None,
                 runtime: str = ONNXRUNTIME):
    """An InferenceSession with sane defaults for a shared, small CPU box (runtime="openvino": an
    OpenVINOSession with the same interface, or ONNX Runtime with one log line when that cannot be had).

    - intra-op spinning off: several sessions in one process on 2 cores ran 2-3.6x slower with
      spinning worker threads (STACK-NOTES);
    - log severity 3 (errors only) so a CPU-only machine does not print provider warnings;
    - CUDA: provider options for adaptive batching (cuda_provider_options), and a check that the session
      really got the CUDA provider: device=cuda raises when ORT fell back to the CPU; device=auto warns
      once and stops asking for CUDA in this process.
    """
    global _cuda_failed
    if _openvino_usable(path, device, runtime or ONNXRUNTIME):
        try:
            return OpenVINOSession(path, threads)
        except Exception as e:  # noqa: BLE001 - a file OpenVINO cannot compile is still served, by ONNX Runtime
            _log_once(f"openvino could not load {Path(path).name} ({type(e).__name__}: {str(e)[:200]}): using "
                      "onnxruntime (same file, same preprocessing)")
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


def warm_up(session, input_shape, max_batch_size: int = 32, sizes=None, dtype=np.float32,
            check=None) -> dict[int, float]:
    """Run the session once per batch size on zeros (input_shape without the batch axis, e.g. (3, 224, 224)).
    -> {batch size: first-run milliseconds}. For the server to call at start-up, before it reports ready.
    check(n, outputs): called with each run's outputs, so the caller can reject a model that does not match
    its card (it raises) at no extra inference."""
    name = session.get_inputs()[0].name
    sizes = sizes if sizes is not None else warm_up_sizes(max_batch_size, session_device(session) == "cuda")
    timings = {}
    for n in sizes:
        t = time.perf_counter()
        outputs = session.run(None, {name: np.zeros((int(n), *input_shape), dtype=dtype)})
        timings[int(n)] = (time.perf_counter() - t) * 1000.0
        if check is not None:
            check(int(n), outputs)
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
