"""BentoML 1.4 inference server for the exported image classifier.

    bentoml serve serving.service:ImageClassifier      # or: make serve / python -m pipeline serve

Endpoints (see docs/serve.md):
- POST /classify     multipart/form-data file field `image` (or the raw file with Content-Type image/*),
                     optional `k` (form field or ?k=, 1..num_classes) -> top-k labels + probabilities.
                     BentoML's own client works: bentoml.SyncHTTPClient(url).classify(image=Path("x.jpg"), k=3).
                     /classify IS the batchable API (BentoML adaptive batching, max_batch_size /
                     max_latency_ms): each request's photo is decoded and preprocessed in a worker
                     thread while parsing the request, then concurrent requests share one runtime call
                     (ONNX Runtime, or OpenVINO when model.json recommends it: serve.runtime).
                     Each answer carries a Server-Timing header: receive (body read and parsed), decode,
                     preprocess, queue (waiting for the batch), inference (the batch's call), respond (ms).
- POST /model_card   the model card stored in the ONNX file (labels, preprocessing, accuracy...).
- GET  /livez /readyz /metrics   BentoML's; /readyz is 200 only after the session loaded and a
                     warm-up inference passed, and while the model file is still the one loaded.

Safety: the model path comes from EDGEPIPE_MODEL (or the Bento's packed serving/model/) only and its
sha256 is checked against model.json; serving.limits answers over-size, slow and excess requests
before any work is queued; the request parser below reads the upload itself, so BentoML never
fetches a URL or reads a server path given as a field value; only the guarded decoder
(pipeline.preprocess.open_image) decodes, with a memory budget and a few decodes at a time; every
bad input gets a 4xx with {"error": "..."}.

Imports only the torch-free core (pipeline.preprocess, pipeline.modelcard, pipeline.runtime) and
serving/*: bentofile.yaml's include list is exactly that set (a test checks it).
"""
import json
import logging
import re
import time
import typing as t
from pathlib import Path

import anyio
import bentoml
import numpy as np
from pydantic import Field
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from pipeline import modelcard, runtime
from pipeline.preprocess import (BadImageError, normalize, open_image, resize_and_crop, set_decode_concurrency,
                                 softmax, top_k)
from serving.lifetime import die_with_parent
from serving.limits import EarlyLimits
from serving.memory import return_large_blocks
from serving.model_files import FileWatch, read_card_file, resolve_model, verify_model_file
from serving.settings import decode_limits, load_settings, service_resources

logger = logging.getLogger("bentoml.edgepipe")
SETTINGS = load_settings()
SERVE = SETTINGS.serve
LIMITS = decode_limits(SERVE)
DECODE_SLOTS = set_decode_concurrency(SERVE.decode_concurrency)

if bentoml.server_context.worker_index is not None:   # a BentoML worker (not the arbiter, not a test importing us)
    die_with_parent()
    return_large_blocks()


# ----------------------------------------------------------------------------------------- errors
class RequestProblem(Exception):
    """A client mistake: becomes a 4xx JSON answer {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    count_rejected(status)
    return JSONResponse({"error": message, "status": status}, status_code=status)


_REJECTED = None


def count_rejected(status: int) -> None:
    """Prometheus counter edgepipe_rejected_requests_total{status} on /metrics."""
    global _REJECTED
    try:
        if _REJECTED is None:
            _REJECTED = bentoml.metrics.Counter(
                name="edgepipe_rejected_requests", documentation="requests answered with a 4xx/5xx error",
                labelnames=["status"])
        _REJECTED.labels(status=str(status)).inc()
    except Exception:  # noqa: BLE001 - metrics are best effort (e.g. outside a server)
        pass


# ------------------------------------------------------------------------------ /classify input
ACCEPTED = "multipart/form-data with a file field `image` (curl -F image=@photo.jpg), or the raw file " \
           "as the body with Content-Type image/* or application/octet-stream"


async def read_classify_request(request) -> tuple[bytes, t.Optional[str]]:
    """The upload's bytes and the raw `k` (form field or query parameter); RequestProblem when unusable.

    Reads the form itself instead of letting BentoML's file field parser do it, because that parser
    downloads a text value as a URL; here a text value is simply an error.
    """
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    k_raw = request.query_params.get("k")
    if media == "multipart/form-data":
        return await _read_form(request, k_raw)
    if media.startswith("image/") or media == "application/octet-stream":
        return await request.body(), k_raw
    if media == "application/x-www-form-urlencoded":   # what a client sends for image="http://..." (no file)
        raise RequestProblem(400, "field `image` must be a file upload, but this form carries no file "
                                  "(URLs and server paths are never fetched): send the file as multipart/form-data")
    if media == "application/json" or media.endswith("+json"):
        raise RequestProblem(415, f"got a JSON body, but /classify takes the image file itself: send {ACCEPTED}")
    shown = content_type[:100] or "no Content-Type"
    raise RequestProblem(415, f"unsupported Content-Type ({shown}); send {ACCEPTED}")


async def _read_form(request, k_raw):
    try:
        form = await request.form(max_files=4, max_fields=16, max_part_size=64 * 1024)
    except Exception as e:  # noqa: BLE001 - MultiPartException / HTTPException(400) / anything from a bad body
        detail = getattr(e, "detail", None) or str(e) or type(e).__name__
        raise RequestProblem(400, f"malformed multipart/form-data body: {str(detail)[:200]}") from None
    try:
        items = form.getlist("image")
        if not items:
            fields = ", ".join(sorted(set(form.keys())))[:200] or "none"
            raise RequestProblem(400, f"missing file field `image` (got fields: {fields}); send {ACCEPTED}")
        item = items[0]
        if not isinstance(item, UploadFile):
            raise RequestProblem(400, "field `image` must be a file upload (a part with a filename), not a "
                                      "text value; URLs and server paths are never fetched: upload the file")
        data = await item.read()
        if "k" in form:
            value = form["k"]
            if isinstance(value, UploadFile):
                raise RequestProblem(400, "field `k` must be a number, not a file")
            k_raw = value
    finally:
        await form.close()
    return data, k_raw


class Item:
    """One /classify request inside a batch: the model input, or the 4xx answer it already earned; `timings`
    (seconds per step) and `ready` (perf_counter when its input was ready) feed the Server-Timing header."""

    __slots__ = ("x", "k", "problem", "timings", "ready")

    def __init__(self, x=None, k=None, problem: t.Optional[RequestProblem] = None, timings=None, ready=None):
        self.x, self.k, self.problem = x, k, problem
        self.timings, self.ready = dict(timings or {}), ready


def server_timing(timings: dict) -> str:
    """{step: seconds} -> a Server-Timing header value (ms): what one request spent where inside the server."""
    return ", ".join(f"{step};dur={1000.0 * sec:.3f}" for step, sec in timings.items())


K_PATTERN = re.compile(r"[0-9]{1,4}")   # plain ASCII digits only: no sign, no spaces, no '²' or '٣'
K_DEFAULT = ("", "null")                 # absent; "null" is what BentoML's client sends for k=None


def parse_k(k, num_classes: int, default: int) -> int:
    if k is None or (isinstance(k, str) and k in K_DEFAULT):
        return min(default, num_classes)
    if isinstance(k, int) and not isinstance(k, bool):
        value = k
    elif isinstance(k, str) and K_PATTERN.fullmatch(k):
        value = int(k)
    else:
        shown = repr(k) if len(repr(k)) <= 40 else repr(k)[:37] + "..."
        raise RequestProblem(400, f"k must be an integer in 1..{num_classes} written with at most 4 ASCII "
                                  f"digits, got {shown}")
    if not 1 <= value <= num_classes:
        raise RequestProblem(400, f"k must be in 1..{num_classes} (the number of classes), got {value}")
    return value


def make_item(data, k_raw, pre: dict, num_classes: int) -> Item:
    """Photo bytes + raw k -> Item; runs in a worker thread. The catch-all of the input path: whatever
    goes wrong with a request's input becomes that request's 4xx, never a 500 for the batch."""
    try:
        k = parse_k(k_raw, num_classes, SERVE.top_k)
        if not isinstance(data, (bytes, bytearray, str, Path)):
            raise RequestProblem(400, f"image must be file bytes, got {type(data).__name__}")
        if isinstance(data, (bytes, bytearray)) and len(data) > SERVE.max_body_mb * 1e6:
            raise RequestProblem(413, f"the image is larger than serve.max_body_mb = {SERVE.max_body_mb:g} MB")
        t0 = time.perf_counter()
        image = open_image(data, limits=LIMITS)          # what pipeline.preprocess.preprocess does, timed
        t1 = time.perf_counter()
        x = normalize(resize_and_crop(image, pre), pre)
        t2 = time.perf_counter()
        return Item(x=x, k=k, timings={"decode": t1 - t0, "preprocess": t2 - t1}, ready=t2)
    except RequestProblem as problem:
        return Item(problem=problem)
    except BadImageError as e:
        return Item(problem=RequestProblem(400, str(e)))
    except Exception as e:  # noqa: BLE001 - not the decoder's (that one is caught in open_image): log it
        logger.exception("edgepipe: unexpected error while reading a /classify input")
        return Item(problem=RequestProblem(400, f"the image could not be processed ({type(e).__name__}); "
                                                f"re-save it as JPEG or PNG"))


_INSTANCE = None   # the loaded ImageClassifier of this worker process (the parser needs its card)
_DECODE_LIMITER = None


def decode_limiter():
    """anyio limiter (created inside the event loop) so that at most DECODE_SLOTS threads decode at
    once: the others wait as coroutines instead of parking threads of anyio's pool of 40."""
    global _DECODE_LIMITER
    if _DECODE_LIMITER is None:
        _DECODE_LIMITER = anyio.CapacityLimiter(DECODE_SLOTS)
    return _DECODE_LIMITER


class ClassifyInput(bentoml.IODescriptor):
    """Input of /classify. On the wire: multipart file field `image` (+ optional `k`), see ACCEPTED.

    The single field `items` is what BentoML's adaptive batching concatenates across concurrent
    requests (one Item per request). from_http_request reads the upload itself and decodes +
    preprocesses it in a worker thread, so the batch runner only runs ONNX Runtime.
    """

    media_type: t.ClassVar[t.Optional[str]] = "multipart/form-data"
    items: t.List[t.Any] = Field(description="multipart/form-data: file field `image` and optional field `k`")

    @classmethod
    def model_json_schema(cls, *args, mode: str = "validation", **kwargs):
        """What clients really send. In BentoML's own schema (/schema.json, mode validation) a file is
        {"type": "file"}: that is what makes bentoml.SyncHTTPClient/AsyncHTTPClient upload a Path or a
        PIL image as a multipart file part; OpenAPI (mode serialization) spells it string/binary."""
        image = ({"type": "file", "format": "image"} if mode == "validation"
                 else {"type": "string", "format": "binary"})
        image["description"] = "the photo (JPEG, PNG, WebP, GIF, BMP, TIFF) as a file upload"
        return {"title": "ClassifyInput", "type": "object", "required": ["image"], "properties": {
            "image": image,
            "k": {"type": "integer", "minimum": 1, "maximum": 9999,
                  "description": "labels to return, 1..num_classes (default serve.top_k); also ?k="}}}

    @classmethod
    async def from_http_request(cls, request, serde):
        started = time.perf_counter()
        try:
            data, k_raw = await read_classify_request(request)
        except RequestProblem as problem:
            return cls.model_construct(items=[Item(problem=problem)])
        except Exception as e:  # noqa: BLE001 - e.g. the client went away mid-body
            problem = RequestProblem(400, f"the request could not be read ({type(e).__name__})")
            return cls.model_construct(items=[Item(problem=problem)])
        service = _INSTANCE
        if service is None or not service.ready:
            return cls.model_construct(items=[Item(problem=RequestProblem(503, "the model is not loaded yet"))])
        received = time.perf_counter()
        item = await anyio.to_thread.run_sync(make_item, data, k_raw, service.pre, len(service.labels),
                                              limiter=decode_limiter())
        item.timings = {"receive": received - started, **item.timings}
        return cls.model_construct(items=[item])


class ClassifyOutput(bentoml.IODescriptor):
    """Output of /classify: {"predictions": [{"label", "index", "probability"}, ...], "model": name}."""

    predictions: t.List[t.Dict[str, t.Any]]
    model: str

    @classmethod
    async def to_http_response(cls, obj, serde):
        # the batch runner gives each request a one-element list holding its ready JSONResponse
        if isinstance(obj, list) and len(obj) == 1:
            obj = obj[0]
        return obj if isinstance(obj, Response) else JSONResponse(obj)


# ------------------------------------------------------------------------------------- the service
def _sizes_text(sizes: list) -> str:
    """[1, 2, ..., 32] -> '1..32' (what CUDA warms up), else the list."""
    if len(sizes) > 3 and sizes == list(range(sizes[0], sizes[-1] + 1)):
        return f"{sizes[0]}..{sizes[-1]}"
    return ", ".join(map(str, sizes))


def gpu_present() -> bool:
    """For device auto: will onnxruntime find a GPU? The cheap half of runtime.cuda_usable() (this onnxruntime has
    the CUDA provider, the driver sees a device) without creating a CUDA session: this runs at import, in BentoML's
    arbiter process too, which must not hold a CUDA context. The worker's session still checks it really got CUDA."""
    import os

    import onnxruntime as ort

    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return runtime.CUDA in ort.get_available_providers() and runtime._driver_sees_gpu()


@bentoml.service(
    name="edgepipe_classifier",
    workers=1,                       # one ORT session uses all cores; more workers would fight for them
    threads=1,                       # the batch runner (sync API) runs one batch at a time
    # a GPU when the model runs on one (serve device cuda, or auto on a machine with a GPU), else CPU only
    resources=service_resources(SETTINGS.device, SERVE.threads, gpu_present),
    # no traffic.max_concurrency: serving.limits applies serve.max_concurrency after the body read
    traffic={"timeout": SERVE.timeout},
    http={"host": SERVE.host, "port": SERVE.port},   # EDGEPIPE_HOST (127.0.0.1); --host / BENTOML_HOST win
)
class ImageClassifier:
    def __init__(self) -> None:
        global _INSTANCE
        started = time.perf_counter()
        self.ready = False
        self._unready_reason = None
        self.model_path, self.model_info = resolve_model(SETTINGS.model, SETTINGS.variant, SETTINGS.device)
        logger.info("edgepipe: %s", verify_model_file(self.model_path, self.model_info["card"]))
        self.watch = FileWatch(self.model_path, self.model_info["card"])
        wanted = SERVE.runtime if SERVE.runtime != "auto" else self.model_info.get("runtime", "onnxruntime")
        self.session = runtime.make_session(self.model_path, device=SETTINGS.device, threads=SERVE.threads,
                                            runtime=wanted)
        self.runtime = runtime.session_runtime(self.session)
        self.card = self._read_card()
        self.labels = list(self.card["labels"])
        self.pre = dict(self.card["preprocessing"])
        self.shape = tuple(int(v) for v in self.pre["input_size"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.providers = self.session.get_providers()
        self._warm_up()
        self.ready = True
        _INSTANCE = self
        logger.info("edgepipe: serving %s (%s, %s on %s, %d classes, input %s, %d decodes at once), ready in %.1f s",
                    self.model_path, self.model_info["variant"], self.runtime, self.providers[0], len(self.labels),
                    list(self.shape), DECODE_SLOTS, time.perf_counter() - started)

    def _read_card(self) -> dict:
        try:
            return modelcard.read_card_from_session(self.session)
        except ValueError:
            if not self.model_info.get("card"):   # e.g. an .ort file without metadata and no model.json
                raise
            return read_card_file(Path(self.model_info["card"]))

    def _warm_up(self) -> None:
        """runtime.warm_up: on CUDA every batch size adaptive batching can form (1..serve.max_batch_size: each new
        shape costs cuDNN algorithm choice and arena growth the first time, which would otherwise land on a
        request), on the CPU 1, 2 (the dynamic batch axis) and the largest. Each output is checked against the card."""
        timings = runtime.warm_up(self.session, self.shape, SERVE.max_batch_size, check=self._check_warm_up)
        logger.info("edgepipe: warmed up batch sizes %s in %.0f ms", _sizes_text(sorted(timings)),
                    sum(timings.values()))

    def _check_warm_up(self, n: int, outputs: list) -> None:
        logits = np.asarray(outputs[0])   # the first output: the one _run serves (self.output_name)
        if logits.shape != (n, len(self.labels)) or not np.isfinite(logits).all():
            raise RuntimeError(f"warm-up inference gave shape {logits.shape} (expected ({n}, {len(self.labels)})) "
                               f"or non-finite values; the model does not match its card")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        logits = self.session.run([self.output_name], {self.input_name: batch})[0]
        return softmax(logits.astype(np.float64)).astype(np.float32)

    def __is_ready__(self) -> bool:
        """Loaded, warmed up, and the model files on disk are still the ones loaded (an orchestrator
        then replaces a server whose export was deleted or rewritten under it)."""
        if not self.ready:
            return False
        reason = self.watch.problem()
        if reason != self._unready_reason:
            self._unready_reason = reason
            if reason:
                logger.warning("edgepipe: not ready: %s; restart the server on the new export", reason)
        return reason is None

    # ---------------------------------------------------------------------------------- APIs
    @bentoml.api(route="/classify", input_spec=ClassifyInput, output_spec=ClassifyOutput, batchable=True,
                 max_batch_size=SERVE.max_batch_size, max_latency_ms=SERVE.max_latency_ms)
    def classify(self, items: t.List[t.Any]) -> t.List[t.Any]:
        """Top-k labels with probabilities for one photo per request; concurrent requests are batched
        (BentoML adaptive batching) into one ONNX Runtime call."""
        out: list = [None] * len(items)
        good = []
        for i, item in enumerate(items):
            if item.problem is not None:
                out[i] = error_response(item.problem.status, item.problem.message)
            else:
                good.append(i)
        if good:
            started = time.perf_counter()
            probs = self._run(np.stack([items[i].x for i in good]))
            done = time.perf_counter()
            name = self.card.get("name", "model")
            for i, row in zip(good, probs):
                item = items[i]
                steps = {**item.timings, "queue": started - item.ready if item.ready else 0.0,
                         "inference": done - started}
                out[i] = JSONResponse({"predictions": top_k(row, self.labels, item.k), "model": name})
                steps["respond"] = time.perf_counter() - done   # top-k + JSON of this and earlier items
                out[i].headers["Server-Timing"] = server_timing(steps) + f', batch;desc="{len(good)}"'
        return out

    def classify_bytes(self, data, k=None) -> dict:
        """In-process convenience (tests, notebooks): the HTTP path minus the transport -> dict with status."""
        response = self.classify([make_item(data, k, self.pre, len(self.labels))])[0]
        return {"status": response.status_code, **json.loads(response.body)}

    @bentoml.api(route="/model_card")
    async def model_card(self) -> t.Dict[str, t.Any]:
        """The model card from the ONNX metadata, plus what this server runs and its limits."""
        return {**self.card, "serving": {
            "file": self.model_path.name, "variant": self.model_info["variant"], "providers": self.providers,
            "runtime": self.runtime,
            "num_classes": len(self.labels), "top_k_default": min(SERVE.top_k, len(self.labels)),
            "max_body_mb": SERVE.max_body_mb, "max_pixels": SERVE.max_pixels,
            "max_decode_mb": SERVE.max_decode_mb, "max_aspect_ratio": SERVE.max_aspect_ratio,
            "decode_concurrency": DECODE_SLOTS, "body_timeout": SERVE.body_timeout,
            "max_batch_size": SERVE.max_batch_size, "max_latency_ms": SERVE.max_latency_ms,
            "max_concurrency": SERVE.max_concurrency, "timeout": SERVE.timeout}}


ImageClassifier.add_asgi_middleware(
    EarlyLimits, max_body_bytes=int(SERVE.max_body_mb * 1e6), body_timeout=SERVE.body_timeout,
    max_concurrency=SERVE.max_concurrency, max_buffered_bytes=int(SERVE.max_buffered_mb * 1e6),
    on_refused=count_rejected)
