"""The FastAPI application of ``medsam3 serve``: the HTTP API, the web viewer and the access token.

Endpoints (all described in ``/openapi.json`` and browsable at ``/docs``):

* ``POST /api/images``: upload an image or volume (multipart field ``file``, or the raw file as the body);
  answers 201 with the image id and metadata (shape, spacing, modality, 2D/3D, display planes).
* ``GET /api/images/{id}``, ``DELETE /api/images/{id}``;
  ``GET /api/images/{id}/display``: the display volume as raw ``uint8`` bytes (C order, shape in the
  metadata's ``display.shape`` and the ``X-Shape`` header);
  ``GET /api/images/{id}/slices/{plane}/{index}.png``.
* ``POST /api/images/{id}/segment``: queue a segmentation (JSON body
  :class:`~medsam3.serve.schemas.SegmentIn`: the whole image, one ``slice`` of a volume, the whole volume
  from boxes drawn on a slice with ``propagate``, or a volume with ``box3d`` prompts in input voxels);
  202 with the job id; 422 for prompts the image cannot take; 503 with ``Retry-After`` when the queue is
  full.
* ``GET /api/jobs/{id}``: ``queued`` / ``running`` / ``done`` / ``failed`` (with ``error``);
  ``GET /api/jobs/{id}/mask`` (the upload's format), ``/dicom-seg`` (DICOM uploads), ``/summary`` (JSON),
  ``/labels`` (raw labels in the display frame), ``/slices/{plane}/{index}.png`` (label values, or
  ``?style=overlay`` for a coloured RGBA overlay); ``DELETE /api/jobs/{id}``.
* ``GET /api/info``: version, model, limits, queue load, feature-cache counters.
* ``GET /``: the web viewer (``static/``); ``GET /login``, ``POST /api/login``, ``POST /api/logout``.

With a token every endpoint except ``/login`` and ``/api/login`` needs it: ``Authorization: Bearer
<token>``, the ``medsam3_token`` cookie (set by ``/api/login``), or ``?token=<token>`` (which also sets the
cookie, for opening the viewer from a link). Every error is JSON ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
import math
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from medsam3 import __version__
from medsam3.serve.errors import ApiError, error_response, install_error_handlers
from medsam3.serve.results import DISPLAY_LABELS
from medsam3.serve.schemas import LoginIn, SegmentIn
from medsam3.serve.service import Service
from medsam3.serve.settings import ServeSettings
from medsam3.serve.store import check_plane
from medsam3.serve.throttle import FailureThrottle
from medsam3.serve.uploads import MASK_OUTPUTS, download_stem

log = logging.getLogger("medsam3.serve")

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "medsam3_token"
_PUBLIC = ("/login", "/api/login", "/static/login.css", "/favicon.ico")
_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _id_param():
    return PathParam(..., min_length=1, max_length=64, description="server-generated id (32 hex digits)")


def _png(array: np.ndarray) -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _token_ok(given: str | None, token: str) -> bool:
    return bool(given and hmac.compare_digest(given.encode(), token.encode()))


def _request_token(request: Request) -> tuple[str | None, bool]:
    """The token the request carries and whether it came in the query string."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(), False
    if COOKIE in request.cookies:
        return request.cookies[COOKIE], False
    q = request.query_params.get("token")
    return (q, True) if q else (None, False)


def swagger_ui_assets() -> Path | None:
    """Folder of Swagger UI's JavaScript and CSS (the ``swagger-ui-bundle`` package), or None.

    Without it ``/docs`` falls back to FastAPI's default, which loads them from a CDN.
    """
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(str(swagger_ui_path))
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def create_app(settings: ServeSettings, loaded=None) -> FastAPI:
    """Build the application; ``loaded`` is a model from :func:`medsam3.model.loading.load_sam3` (loaded
    here from ``settings.model`` when omitted, once, before the server accepts requests)."""
    if loaded is None:
        from medsam3.model.loading import load_sam3

        loaded = load_sam3(settings.model, device=settings.device, dtype=settings.dtype)
    service = Service(settings, loaded)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def sweep():
            while True:
                await asyncio.sleep(settings.cleanup_period)
                try:
                    await run_in_threadpool(service.cleanup)
                except Exception:  # the sweeper must keep running
                    log.exception("cleanup failed")

        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            service.close()

    app = FastAPI(
        docs_url=None,  # served below from local files: the viewer machine may be offline
        title="medsam3",
        version=__version__,
        description="Prompt-driven medical image segmentation with SAM3: upload an image or volume, "
        "segment it from text / box / point prompts, download the label map. Errors are JSON "
        '`{"error": "..."}`.',
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings
    throttle = FailureThrottle()
    install_error_handlers(app, hide=service.hidden_paths)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        set_cookie = False
        host = request.headers.get("host")
        if not settings.host_allowed(host):
            return error_response(
                400,
                f"unknown Host {host!r}: this server answers as localhost or the address it serves on "
                "(server option --allowed-host adds names)",
            )
        origin = request.headers.get("origin")
        if request.method in ("POST", "PUT", "PATCH", "DELETE") and origin and origin != "null":
            if urlsplit(origin).netloc.lower() != (host or "").lower():
                return error_response(403, f"cross-origin request from {origin} refused")
        client = request.client.host if request.client else "unknown"
        if settings.token is not None:
            wait = throttle.wait(client)
            if wait > 0:
                return error_response(
                    429,
                    f"too many failed authentication attempts from {client}; retry in {math.ceil(wait)} s",
                    {"Retry-After": str(math.ceil(wait))},
                )
        if settings.token is not None and path not in _PUBLIC:
            given, from_query = _request_token(request)
            if not _token_ok(given, settings.token):
                if given:  # a wrong token, not a missing one
                    throttle.failed(client)
                wants_page = request.method == "GET" and "text/html" in request.headers.get("accept", "")
                if wants_page and path in ("/", "/index.html"):
                    return RedirectResponse("/login", status_code=303)
                return error_response(
                    401,
                    "authentication required: send 'Authorization: Bearer <token>' or log in at /login",
                    {"WWW-Authenticate": "Bearer"},
                )
            set_cookie = from_query
        if request.method in ("POST", "PUT", "PATCH") and path != "/api/images":
            length = request.headers.get("content-length")
            if length is None and request.headers.get("transfer-encoding"):
                return error_response(411, "send the request body with a Content-Length")
            if length is not None and length.isdigit() and int(length) > settings.max_json_bytes:
                return error_response(413, f"request body too large (limit {settings.max_json_kb:g} KB)")
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if path in ("/", "/index.html", "/login"):
            response.headers["Content-Security-Policy"] = _CSP
            response.headers["X-Frame-Options"] = "DENY"
        if set_cookie:
            response.set_cookie(COOKIE, settings.token, httponly=True, samesite="strict")
        return response

    # -- viewer and login ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/login", include_in_schema=False)
    async def login_page(failed: int = 0):
        page = (STATIC / "login.html").read_text(encoding="utf-8")
        if failed:
            page = page.replace("<!--message-->", '<p class="error">That token was not accepted.</p>')
        return HTMLResponse(page)

    @app.post("/login", include_in_schema=False)
    async def login_form(request: Request):
        form = await request.form(max_files=0, max_fields=2)
        token = form.get("token")
        if settings.token is not None and not (isinstance(token, str) and _token_ok(token, settings.token)):
            throttle.failed(request.client.host if request.client else "unknown")
        if settings.token is None or (isinstance(token, str) and _token_ok(token, settings.token)):
            response = RedirectResponse("/", status_code=303)
            if settings.token is not None:
                response.set_cookie(COOKIE, settings.token, httponly=True, samesite="strict")
            return response
        return RedirectResponse("/login?failed=1", status_code=303)

    @app.post("/api/login", tags=["auth"], summary="exchange the token for a session cookie")
    async def login(body: LoginIn, request: Request):
        if settings.token is None:
            return {"ok": True, "auth": False}
        if not _token_ok(body.token, settings.token):
            throttle.failed(request.client.host if request.client else "unknown")
            raise ApiError(401, "wrong token")
        response = JSONResponse({"ok": True, "auth": True})
        response.set_cookie(COOKIE, settings.token, httponly=True, samesite="strict")
        return response

    @app.post("/api/logout", tags=["auth"], summary="forget the session cookie")
    async def logout():
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE)
        return response

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    docs_assets = swagger_ui_assets()
    if docs_assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=docs_assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        """Swagger UI over ``/openapi.json``, its JavaScript and CSS served locally when available."""
        local = (
            {
                "swagger_js_url": "/docs-assets/swagger-ui-bundle.js",
                "swagger_css_url": "/docs-assets/swagger-ui.css",
                "swagger_favicon_url": "/favicon.ico",
            }
            if docs_assets is not None
            else {}
        )
        return get_swagger_ui_html(openapi_url="/openapi.json", title="medsam3 API", **local)

    # -- information ---------------------------------------------------------------------------------
    @app.get("/api/info", tags=["server"], summary="version, model, limits, queue and cache state")
    async def info():
        return service.info()

    # -- images --------------------------------------------------------------------------------------
    upload_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {
                                "type": "string",
                                "format": "binary",
                                "description": "NIfTI, NRRD, DICOM series as .zip, DICOM file, PNG, JPEG, "
                                "BMP or TIFF",
                            },
                            "series_uid": {
                                "type": "string",
                                "description": "DICOM series to read when the zip holds several",
                            },
                            "modality": {
                                "type": "string",
                                "description": "override the guessed modality (CT, MR, ...)",
                            },
                        },
                    }
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }

    @app.post(
        "/api/images",
        status_code=201,
        tags=["images"],
        openapi_extra=upload_body,
        summary="upload an image or volume",
        responses={413: {"description": "too large"}, 415: {"description": "unsupported content"}},
    )
    async def upload(request: Request):
        return await service.add_upload(request)

    @app.get("/api/images/{image_id}", tags=["images"], summary="metadata of an uploaded image")
    async def image_info(image_id: str = _id_param()):
        return service.images.get(image_id).info

    @app.delete("/api/images/{image_id}", tags=["images"], summary="remove an uploaded image")
    async def image_delete(image_id: str = _id_param()):
        service.images.get(image_id)
        busy = service.pending_jobs(image_id)
        if busy:
            raise ApiError(
                409, f"image {image_id} has {busy} job(s) queued or running; delete it when they end"
            )
        service.images.remove(image_id)
        return {"deleted": image_id}

    @app.get(
        "/api/images/{image_id}/display",
        tags=["viewer"],
        summary="the display volume as raw uint8 bytes (shape in X-Shape)",
    )
    async def image_display(image_id: str = _id_param()):
        rec = service.images.get(image_id)
        array = await run_in_threadpool(lambda: np.ascontiguousarray(service.images.display(rec)))
        return Response(
            array.tobytes(),
            media_type="application/octet-stream",
            headers={"X-Shape": ",".join(map(str, array.shape)), "X-Dtype": "uint8"},
        )

    @app.get(
        "/api/images/{image_id}/slices/{plane}/{index}.png",
        tags=["viewer"],
        summary="one display slice as PNG",
    )
    async def image_slice(
        image_id: str = _id_param(),
        plane: str = PathParam(..., max_length=20),
        index: int = PathParam(..., ge=0),
    ):
        rec = service.images.get(image_id)
        data = await run_in_threadpool(lambda: _png(service.images.display_slice(rec, plane, index)))
        return Response(data, media_type="image/png")

    @app.post(
        "/api/images/{image_id}/segment",
        status_code=202,
        tags=["segmentation"],
        summary="queue a segmentation of an uploaded image",
        responses={503: {"description": "queue full; see Retry-After"}},
    )
    async def segment(body: SegmentIn, image_id: str = _id_param()):
        job = service.submit(image_id, body)
        return service.job_status(job)

    # -- jobs ----------------------------------------------------------------------------------------
    @app.get("/api/jobs/{job_id}", tags=["segmentation"], summary="status of a job")
    async def job_status(job_id: str = _id_param()):
        return service.job_status(service.get_job(job_id))

    @app.delete("/api/jobs/{job_id}", tags=["segmentation"], summary="remove a finished job's results")
    async def job_delete(job_id: str = _id_param()):
        job = service.get_job(job_id)
        if not job.ended:
            raise ApiError(409, f"job {job.id} is {job.status}; it can be removed once it has ended")
        service.cleanup_job(job)
        return {"deleted": job_id}

    def _download(job, kind: str, media: str, filename: str) -> FileResponse:
        path = service.job_file(job, kind)
        return FileResponse(path, media_type=media, filename=filename)

    @app.get(
        "/api/jobs/{job_id}/mask",
        tags=["segmentation"],
        summary="the label map in the upload's format and geometry",
    )
    async def job_mask(job_id: str = _id_param()):
        job = service.get_job(job_id)
        rec = service.images.get(job.image_id)
        file_name, media = MASK_OUTPUTS[rec.stored.kind]
        ext = file_name.split(".", 1)[1]
        return _download(job, "mask", media, f"{download_stem(rec.name)}_mask.{ext}")

    @app.get("/api/jobs/{job_id}/dicom-seg", tags=["segmentation"], summary="the label map as DICOM SEG")
    async def job_seg(job_id: str = _id_param()):
        job = service.get_job(job_id)
        rec = service.images.get(job.image_id)
        return _download(job, "dicom_seg", "application/dicom", f"{download_stem(rec.name)}_seg.dcm")

    @app.get("/api/jobs/{job_id}/summary", tags=["segmentation"], summary="the JSON summary of a job")
    async def job_summary(job_id: str = _id_param()):
        job = service.get_job(job_id)
        rec = service.images.get(job.image_id)
        return _download(job, "summary", "application/json", f"{download_stem(rec.name)}_summary.json")

    def _display_labels(job) -> np.ndarray:
        service.job_file(job, "mask")
        return np.load(job.folder / DISPLAY_LABELS, mmap_mode="r", allow_pickle=False)

    @app.get(
        "/api/jobs/{job_id}/labels",
        tags=["viewer"],
        summary="labels in the display frame as raw bytes (dtype in X-Dtype, shape in X-Shape)",
    )
    async def job_labels(job_id: str = _id_param()):
        job = service.get_job(job_id)
        array = await run_in_threadpool(lambda: np.ascontiguousarray(_display_labels(job)))
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        return Response(
            little.tobytes(),
            media_type="application/octet-stream",
            headers={"X-Shape": ",".join(map(str, array.shape)), "X-Dtype": str(array.dtype)},
        )

    @app.get(
        "/api/jobs/{job_id}/slices/{plane}/{index}.png",
        tags=["viewer"],
        summary="one label slice as PNG (values, or style=overlay for colours)",
    )
    async def job_slice(
        job_id: str = _id_param(),
        plane: str = PathParam(..., max_length=20),
        index: int = PathParam(..., ge=0),
        style: str = Query("labels", pattern="^(labels|overlay)$"),
    ):
        from medsam3.preprocess.slices import take_slice

        job = service.get_job(job_id)
        rec = service.images.get(job.image_id)
        axis = check_plane(rec.info, plane, index)

        def render() -> bytes:
            sl = np.ascontiguousarray(take_slice(_display_labels(job), axis, index, display=True))
            if style == "labels":
                return _png(sl if sl.dtype.itemsize <= 2 else sl.astype(np.uint16))
            rgba = np.zeros((*sl.shape, 4), dtype=np.uint8)
            assert job.result is not None  # _display_labels found the finished job's files
            for entry in job.result["labels"]:
                if entry["value"] is not None and entry["color"] is not None:
                    rgba[sl == entry["value"]] = (*entry["color"], 255)
            return _png(rgba)

        return Response(await run_in_threadpool(render), media_type="image/png")

    return app
