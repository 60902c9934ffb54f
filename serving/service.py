"""BentoML 1.4 inference server for the exported image classifier.

    bentoml serve serving.service:ImageClassifier      # or: make serve / python -m pipeline serve

Endpoints (see docs/serve.md):
- POST /classify     multipart/form-data file field `image` (or the raw file with Content-Type image/*),
                     optional `k` (form field or ?k=, 1..num_classes) -> top-k labels + probabilities.
                     /classify IS the batchable API (BentoML adaptive batching, max_batch_size /
                     max_latency_ms): each request's photo is decoded and preprocessed in its own worker
                     thread while parsing the request, then concurrent requests share one ONNX Runtime call.
- POST /model_card   the model card stored in the ONNX file (labels, preprocessing, accuracy...).
- GET  /livez /readyz /metrics   BentoML's; /readyz is 200 only after the session loaded and a
                     warm-up inference passed (__is_ready__).

Safety: the model path comes from EDGEPIPE_MODEL (or the Bento's packed serving/model/) only; the
request parser below reads the upload itself, so BentoML never fetches a URL or reads a server path
given as a field value; every bad input gets a 4xx with {"error": "..."}; bodies over
serve.max_body_mb get 413 before they are read; images over serve.max_pixels are refused before decoding.
"""
import json
import logging
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
from pipeline.preprocess import BadImageError, preprocess, softmax, top_k
from pipeline.serve import resolve_model
from serving.settings import load_settings

logger = logging.getLogger("bentoml.edgepipe")
SETTINGS = load_settings()
SERVE = SETTINGS.serve


# ----------------------------------------------------------------------------------------- errors
class RequestProblem(Exception):
    """A client mistake: becomes a 4xx JSON answer {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    _count_rejected(status)
    return JSONResponse({"error": message, "status": status}, status_code=status)


_REJECTED = None


def _count_rejected(status: int) -> None:
    """Prometheus counter edgepipe_rejected_requests_total{status} on /metrics."""
    global _REJECTED
    try:
        if _REJECTED is None:
            _REJECTED = bentoml.metrics.Counter(
                name="edgepipe_rejected_requests", documentation="requests answered with a 4xx/5xx error",
                labelnames=["status"])
        _REJECTED.labels(status=str(status)).inc()
    except Exception:  # metrics are best effort (e.g. outside a server)
        pass


# ------------------------------------------------------------------------- body size (413) middleware
class BodyLimitMiddleware:
    """413 for request bodies over max_bytes, decided before the body reaches BentoML's parsers.

    With Content-Length the check is immediate; chunked bodies are buffered up to the limit. The
    rejected body is drained (up to a cap) so that ordinary HTTP clients can read the 413 answer.
    """

    DRAIN_CAP = 256 * 1024 * 1024

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def _reject(self, scope, receive, send, seen: int, more: bool) -> None:
        while more and seen < self.DRAIN_CAP:
            message = await receive()
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
        mb = self.max_bytes / 1e6
        await error_response(413, f"the request body is larger than serve.max_body_mb = {mb:g} MB; "
                                  f"send a smaller (re-encoded or resized) image")(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await error_response(400, "invalid Content-Length header")(scope, receive, send)
        if length is not None:
            if length > self.max_bytes:
                return await self._reject(scope, receive, send, 0, True)
            return await self.app(scope, receive, send)
        # chunked upload: buffer up to the limit, then replay it to the app
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)   # client went away; let the app see it
            body = message.get("body", b"")
            seen += len(body)
            more = message.get("more_body", False)
            if seen > self.max_bytes:
                return await self._reject(scope, receive, send, seen, more)
            chunks.append(body)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


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
        try:
            form = await request.form(max_files=4, max_fields=16, max_part_size=64 * 1024)
        except Exception as e:  # MultiPartException / HTTPException(400) from Starlette
            detail = getattr(e, "detail", None) or str(e) or type(e).__name__
            raise RequestProblem(400, f"malformed multipart/form-data body: {detail}") from None
        try:
            items = form.getlist("image")
            if not items:
                fields = ", ".join(sorted(set(form.keys()))) or "none"
                raise RequestProblem(400, f"missing file field `image` (got fields: {fields}); send {ACCEPTED}")
            item = items[0]
            if not isinstance(item, UploadFile):
                raise RequestProblem(400, "field `image` must be a file upload (a part with a filename), "
                                          "not a text value; URLs and server paths are never fetched")
            data = await item.read()
            if "k" in form:
                value = form["k"]
                if isinstance(value, UploadFile):
                    raise RequestProblem(400, "field `k` must be a number, not a file")
                k_raw = value
        finally:
            await form.close()
        return data, k_raw
    if media.startswith("image/") or media == "application/octet-stream":
        return await request.body(), k_raw
    if media == "application/json" or media.endswith("+json"):
        raise RequestProblem(415, f"got a JSON body, but /classify takes the image file itself: send {ACCEPTED}")
    shown = content_type or "no Content-Type"
    raise RequestProblem(415, f"unsupported Content-Type ({shown}); send {ACCEPTED}")


class Item:
    """One /classify request inside a batch: the model input, or the 4xx answer it already earned."""

    __slots__ = ("x", "k", "problem")

    def __init__(self, x=None, k=None, problem: t.Optional[RequestProblem] = None):
        self.x, self.k, self.problem = x, k, problem


def parse_k(k, num_classes: int, default: int) -> int:
    if k is None or (isinstance(k, str) and k.strip().lower() in ("", "null", "none")):
        return min(default, num_classes)
    value = None
    if isinstance(k, int) and not isinstance(k, bool):
        value = k
    elif isinstance(k, str) and k.strip().lstrip("+-").isdigit():
        value = int(k.strip())
    if value is None:
        raise RequestProblem(400, f"k must be an integer in 1..{num_classes}, got {k!r}")
    if not 1 <= value <= num_classes:
        raise RequestProblem(400, f"k must be in 1..{num_classes} (the number of classes), got {value}")
    return value


def make_item(data, k_raw, pre: dict, num_classes: int) -> Item:
    """Photo bytes (or a path, for in-process callers) + raw k -> Item. Runs in a worker thread."""
    try:
        k = parse_k(k_raw, num_classes, SERVE.top_k)
        if isinstance(data, (bytes, bytearray)) and len(data) > SERVE.max_body_mb * 1e6:
            raise RequestProblem(413, f"the image is larger than serve.max_body_mb = {SERVE.max_body_mb:g} MB")
        if not isinstance(data, (bytes, bytearray, str, Path)):
            raise RequestProblem(400, f"image must be file bytes, got {type(data).__name__}")
        return Item(x=preprocess(data, pre, max_pixels=SERVE.max_pixels), k=k)
    except RequestProblem as problem:
        return Item(problem=problem)
    except BadImageError as e:
        return Item(problem=RequestProblem(400, str(e)))


_INSTANCE = None   # the loaded ImageClassifier of this worker process (the parser needs its card)


class ClassifyInput(bentoml.IODescriptor):
    """Input of /classify. On the wire: multipart file field `image` (+ optional `k`), see ACCEPTED.

    The single field `items` is what BentoML's adaptive batching concatenates across concurrent
    requests (one Item per request). from_http_request reads the upload itself and decodes +
    preprocesses it in a worker thread, so the batch runner only runs ONNX Runtime.
    """

    media_type: t.ClassVar[t.Optional[str]] = "multipart/form-data"
    items: t.List[t.Any] = Field(description="multipart/form-data: file field `image` and optional field `k`")

    @classmethod
    def model_json_schema(cls, *args, **kwargs):   # what clients really send (OpenAPI / Swagger UI)
        return {"title": "ClassifyInput", "type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary",
                      "description": "the photo (JPEG, PNG, WebP, BMP, GIF, TIFF) as a file upload"},
            "k": {"type": "integer", "minimum": 1,
                  "description": "labels to return, 1..num_classes (default serve.top_k); also ?k="}}}

    @classmethod
    async def from_http_request(cls, request, serde):
        try:
            data, k_raw = await read_classify_request(request)
        except RequestProblem as problem:
            return cls.model_construct(items=[Item(problem=problem)])
        service = _INSTANCE
        if service is None or not service.ready:
            return cls.model_construct(items=[Item(problem=RequestProblem(503, "the model is not loaded yet"))])
        item = await anyio.to_thread.run_sync(make_item, data, k_raw, service.pre, len(service.labels))
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
@bentoml.service(
    name="edgepipe_classifier",
    workers=1,                       # one ORT session uses all cores; more workers would fight for them
    threads=1,                       # the batch runner (sync API) runs one batch at a time
    traffic={"timeout": SERVE.timeout, "max_concurrency": SERVE.max_concurrency},
    http={"host": SERVE.host, "port": SERVE.port},   # EDGEPIPE_HOST (127.0.0.1); --host / BENTOML_HOST win
)
class ImageClassifier:
    def __init__(self) -> None:
        global _INSTANCE
        started = time.perf_counter()
        self.ready = False
        self.model_path, self.model_info = resolve_model(SETTINGS.model, SETTINGS.variant, SETTINGS.device)
        self.session = runtime.make_session(self.model_path, device=SETTINGS.device, threads=SERVE.threads)
        try:
            self.card = modelcard.read_card_from_session(self.session)
        except ValueError:
            if not self.model_info.get("card"):   # e.g. an .ort file without metadata and no model.json
                raise
            self.card = json.loads(Path(self.model_info["card"]).read_text(encoding="utf-8"))
        self.labels = list(self.card["labels"])
        self.pre = dict(self.card["preprocessing"])
        self.shape = tuple(int(v) for v in self.pre["input_size"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.providers = self.session.get_providers()
        self._warm_up()
        self.ready = True
        _INSTANCE = self
        logger.info("edgepipe: serving %s (%s, %s, %d classes, input %s), ready in %.1f s",
                    self.model_path, self.model_info["variant"], self.providers[0],
                    len(self.labels), list(self.shape), time.perf_counter() - started)

    def _warm_up(self) -> None:
        """One inference through the real code path (batch of 2: checks the dynamic batch axis)."""
        probs = self._run(np.zeros((2, *self.shape), dtype=np.float32))
        if probs.shape != (2, len(self.labels)) or not np.isfinite(probs).all():
            raise RuntimeError(f"warm-up inference gave shape {probs.shape} (expected (2, {len(self.labels)})) "
                               f"or non-finite values; the model does not match its card")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        logits = self.session.run([self.output_name], {self.input_name: batch})[0]
        return softmax(logits.astype(np.float64)).astype(np.float32)

    def __is_ready__(self) -> bool:
        return self.ready

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
            probs = self._run(np.stack([items[i].x for i in good]))
            name = self.card.get("name", "model")
            for i, row in zip(good, probs):
                out[i] = JSONResponse({"predictions": top_k(row, self.labels, items[i].k), "model": name})
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
            "num_classes": len(self.labels), "top_k_default": min(SERVE.top_k, len(self.labels)),
            "max_body_mb": SERVE.max_body_mb, "max_pixels": SERVE.max_pixels,
            "max_batch_size": SERVE.max_batch_size, "max_latency_ms": SERVE.max_latency_ms,
            "max_concurrency": SERVE.max_concurrency, "timeout": SERVE.timeout}}


ImageClassifier.add_asgi_middleware(BodyLimitMiddleware, max_bytes=int(SERVE.max_body_mb * 1e6))
