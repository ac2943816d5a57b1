"""The FastAPI app: a JSON API under ``/api`` (OpenAPI schema at ``/api/openapi.json``, docs at
``/api/docs``) and one static HTML/JS page at ``/``.

Items are addressed by their index id in a query parameter (``?id=...``), so ids with slashes need no
path tricks and nothing from the URL is ever joined to a file path.
"""

from __future__ import annotations

import asyncio
import logging
import re
from importlib import resources

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..index.store import CorruptIndexError
from .service import NotFound, SearchResult, SearchService, UploadError, decode_upload

API = "/api"


class WordWeight(BaseModel):
    word: str
    weight: float


class Contribution(BaseModel):
    word: str
    query_weight: float
    doc_weight: float
    contribution: float  # query_weight * doc_weight


class HitOut(BaseModel):
    rank: int
    id: str
    score: float  # = sum of all contributions (the list below is cut to the top ones)
    words: list[Contribution]
    n_shared_words: int
    text: str | None = None  # captions only
    image_url: str | None = None  # images only


class SearchOut(BaseModel):
    kind: str
    query: str
    query_words: list[WordWeight]
    hits: list[HitOut]
    captions: list[HitOut]
    took_ms: float
    items: int


class InfoOut(BaseModel):
    model: str
    items: int
    captions: bool
    vocabulary: int
    backend: str
    max_upload_bytes: int
    max_k: int
    default_k: int


class TextMatchOut(BaseModel):
    text: str
    score: float
    shared_words: list[WordWeight]  # word, image weight x text weight
    patch_scores: list[list[float]]
    heatmap_url: str


class ExplainOut(BaseModel):
    id: str
    active_words: int
    words: list[WordWeight]
    grid: list[int]
    patch_words: list[list[WordWeight]]
    query: TextMatchOut | None = None
    image_url: str
    wordcloud_url: str
    patches_url: str


class ErrorOut(BaseModel):
    detail: str


def _url(path: str, **params: str) -> str:
    from urllib.parse import urlencode

    return f"{API}/{path}?{urlencode(params)}"


def _hit_out(hit, n_words: int | None, caption: bool = False) -> HitOut:
    words = [Contribution(word=w.word, query_weight=w.query_weight, doc_weight=w.doc_weight,
                          contribution=w.contribution) for w in hit.explanation.top(n_words)]
    return HitOut(rank=hit.rank, id=hit.id, score=hit.score, words=words, n_shared_words=hit.explanation.n_shared,
                  text=hit.metadata.get("text") if caption else None,
                  image_url=None if caption else _url("image", id=hit.id))


def _search_out(res: SearchResult, service: SearchService, all_words: bool = False) -> SearchOut:
    n = None if all_words else service.config.tile_words
    return SearchOut(kind=res.kind, query=res.query,
                     query_words=[WordWeight(word=w, weight=s) for w, s in res.query_words],
                     hits=[_hit_out(h, n) for h in res.hits], captions=[_hit_out(h, n, True) for h in res.captions],
                     took_ms=round(res.seconds * 1000, 2), items=service.n_items())


def _ww(pairs) -> list[WordWeight]:
    return [WordWeight(word=w, weight=s) for w, s in pairs]


# The page loads only its own script, style and images (the API returns JSON rendered as text).
PAGE_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


logger = logging.getLogger(__name__)

_ABS_PATH = re.compile(r"(?<![\w:/.])/(?:[^\s'\":,()/]+/)*([^\s'\":,()/]+)")


def public_message(exc: BaseException) -> str:
    """An error's text for a client: absolute file paths cut to their last part (docs/web.md: the
    server's folders are never disclosed; items are named by id)."""
    return _ABS_PATH.sub(lambda m: m.group(1), str(exc))


def create_app(service: SearchService, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The web app over a :class:`SearchService`.

    ``allowed_hosts``: accepted ``Host`` headers (``lexvla serve`` passes the loopback names when bound to
    loopback, which stops DNS-rebinding pages from reaching the app); None accepts any.
    """
    app = FastAPI(title="lexvla", version="0.1.0", openapi_url=f"{API}/openapi.json", docs_url=f"{API}/docs",
                  redoc_url=None,
                  description="Explainable lexical image search: every hit lists the words it shares with "
                              "the query, weighted so that they sum to its score.")
    config = service.config
    errors = {404: {"model": ErrorOut}, 422: {"model": ErrorOut}}

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": public_message(exc)}, status_code=404)

    @app.exception_handler(UploadError)
    async def _bad_upload(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": public_message(exc)}, status_code=exc.status)

    @app.exception_handler(CorruptIndexError)
    async def _damaged(request: Request, exc: CorruptIndexError) -> JSONResponse:
        logger.error("%s", exc)  # the full path goes to the server log, not to the client
        return JSONResponse({"detail": public_message(exc)}, status_code=500)

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": public_message(exc)}, status_code=422)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        # Refuse oversized or length-less bodies before anything is read or spooled to disk.
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None:
                return JSONResponse({"detail": "uploads must declare a Content-Length"}, status_code=411)
            if not length.isdigit() or int(length) > config.max_upload_bytes + 64 * 1024:  # + multipart framing
                return JSONResponse({"detail": f"request body too large; uploads are limited to "
                                               f"{config.max_upload_bytes} bytes"}, status_code=413)
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    async def off_loop(fn, *args):
        """Run model / index work on the service's bounded worker pool, never on the event loop, and
        hand back a response already serialised there (so the loop only moves bytes)."""
        return await asyncio.wrap_future(service.submit(fn, *args))

    def json_bytes(model: BaseModel) -> Response:
        return Response(model.model_dump_json(), media_type="application/json")

    @app.get(f"{API}/info", response_model=InfoOut, tags=["index"])
    async def info() -> InfoOut:
        """The model and index being served, and the app's limits (answered on the event loop: it never
        waits behind searches)."""
        return InfoOut(model=service.model_name, items=service.n_items(), captions=service.has_captions,
                       vocabulary=service.index.dim, backend=service.index.backend_name,
                       max_upload_bytes=config.max_upload_bytes, max_k=config.max_k, default_k=config.default_k)

    @app.get(f"{API}/search", response_model=SearchOut, responses=errors, tags=["search"])
    async def search(q: str = Query(..., description="text query", max_length=config.max_query_chars),
                     k: int = Query(config.default_k, ge=1, le=config.max_k),
                     all_words: bool = Query(False, description="every shared word of every hit, not only the "
                                                                "shown ones")) -> Response:
        """Text -> images. Every hit lists its shared words by contribution (query x image weight)."""
        return await off_loop(lambda: json_bytes(_search_out(service.search_text(q, k, all_words), service,
                                                             all_words)))

    @app.post(f"{API}/search/image", response_model=SearchOut,
              responses={**errors, 411: {"model": ErrorOut}, 413: {"model": ErrorOut}, 415: {"model": ErrorOut}},
              tags=["search"])
    async def search_image(file: UploadFile = File(..., description="an image file (JPEG, PNG, GIF, WebP, BMP, "
                                                                    "TIFF)"),
                           k: int = Query(config.default_k, ge=1, le=config.max_k),
                           all_words: bool = Query(False)) -> Response:
        """Image -> images (and -> captions when the index has them). The type is read from the bytes."""
        data = await file.read(config.max_upload_bytes + 1)
        name = (file.filename or "upload")[:100]

        def run() -> Response:
            image = decode_upload(data, config)
            return json_bytes(_search_out(service.search_image(image, k, name=name, all_words=all_words), service,
                                          all_words))

        return await off_loop(run)

    @app.get(f"{API}/item", responses=errors, tags=["items"])
    def item(id: str = Query(..., max_length=1000)) -> dict:
        """An indexed image's id and metadata (its file path is not disclosed)."""
        meta = service.item(id)
        meta.pop("path", None)
        return {**meta, "image_url": _url("image", id=id)}

    @app.get(f"{API}/image", response_class=FileResponse, responses=errors, tags=["items"])
    def image(id: str = Query(..., max_length=1000)) -> FileResponse:
        """An indexed image's file, looked up by id (never by a path from the request)."""
        path, media = service.image_file(id)
        return FileResponse(path, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @app.get(f"{API}/explain", response_model=ExplainOut, responses=errors, tags=["explain"])
    async def explain(id: str = Query(..., max_length=1000),
                      q: str | None = Query(None, max_length=config.max_query_chars,
                                            description="text whose patch heat map to compute")) -> Response:
        """An image's words, its patches' top words and (with ``q``) which patches the text lights up."""

        def run() -> Response:
            expl = service.explain(id, q)
            match = None
            if expl.texts:
                t = expl.texts[0]
                match = TextMatchOut(text=t.text, score=t.score, shared_words=_ww(t.shared_words[:20]),
                                     patch_scores=t.patch_scores.tolist(),
                                     heatmap_url=_url("picture", id=id, kind="heatmap", q=t.text))
            extra = {"q": expl.texts[0].text} if expl.texts else {}  # reuse this explanation for the pictures
            return json_bytes(ExplainOut(
                id=id, active_words=expl.active_words, words=_ww(expl.words[:40]), grid=list(expl.grid),
                patch_words=[_ww(pw) for pw in expl.patch_words], query=match, image_url=_url("image", id=id),
                wordcloud_url=_url("picture", id=id, kind="wordcloud", **extra),
                patches_url=_url("picture", id=id, kind="patches", **extra)))

        return await off_loop(run)

    @app.get(f"{API}/picture", responses={**errors, 200: {"content": {"image/png": {}}}}, tags=["explain"])
    async def picture(id: str = Query(..., max_length=1000),
                      kind: str = Query(..., pattern="^(wordcloud|patches|heatmap)$"),
                      q: str | None = Query(None, max_length=config.max_query_chars)) -> Response:
        """PNG: the image's word cloud, its patch-word grid, or the heat map of text ``q``."""
        png = await off_loop(service.picture, id, kind, q)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    static = resources.files("lexvla.web") / "static"
    index_html = (static / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return Response(index_html, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP})

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    return app
