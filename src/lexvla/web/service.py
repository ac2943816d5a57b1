"""What the web app does, without HTTP: search an index with a model, explain hits, draw pictures.

Safety rules live here so they hold whatever the transport:

- files are only ever opened from paths recorded in the index (looked up by item id); nothing the
  client sends becomes a path;
- uploads are decoded only after their size and their magic bytes (Pillow's format detection, not
  the file name or the declared content type) are checked, with a pixel-count limit against
  decompression bombs.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..index import Hit, SparseIndex
from ..preprocess import ImageLoadError, decode_image

logger = logging.getLogger(__name__)

# Pillow format name -> media type, for the formats accepted as uploads and served back.
IMAGE_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
                     "BMP": "image/bmp", "TIFF": "image/tiff"}


class UploadError(ValueError):
    """A rejected upload; ``status`` is the HTTP status the web layer answers with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class NotFound(KeyError):
    """An item id that is not in the index (or whose file is gone)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else "not found"


@dataclass(frozen=True)
class WebConfig:
    """Limits and defaults of the web app."""

    max_upload_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # ~ 6300 x 6300; larger images are refused before decoding
    max_query_chars: int = 300
    default_k: int = 24
    max_k: int = 100
    tile_words: int = 6  # matching words shown per result tile
    cache_items: int = 64  # explained items kept in memory (patch vectors + pictures)
    # Query path (docs/web.md measures each): concurrent text queries are encoded together, at most
    # batch_size per model call, the first waiting at most batch_wait_ms for others while more searches
    # are in flight; encoded query vectors are cached (query_cache entries, 0: off); model and index work
    # runs on `workers` threads, never on the server's event loop, so /api/info does not wait behind it.
    batch_size: int = 8
    batch_wait_ms: float = 3.0
    query_cache: int = 512
    workers: int = 8
    # torch intra-op threads in the encoder and worker threads (0: leave torch's setting). Set per thread:
    # OpenMP gives every new thread the default (all cores), whatever the main thread asked for.
    torch_threads: int = 0
    # Encoder threads taking batches from the query queue (0: one per core, at most 4): with one torch
    # thread each, a second batch runs on the second core instead of waiting for the first.
    encoders: int = 0
    # Exact, cheaper query encode (lexvla.models.text_fast): LoRA merged into the weights and the prompt's
    # constant prefix encoded once; vectors equal the plain encode's to float rounding (docs/web.md).
    fast_encode: bool = True
    upload_formats: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1024:
            raise ValueError(f"max_upload_bytes must be >= 1024, got {self.max_upload_bytes}")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"need 1 <= default_k ({self.default_k}) <= max_k ({self.max_k})")
        if self.max_query_chars < 1 or self.tile_words < 1 or self.cache_items < 1:
            raise ValueError("max_query_chars, tile_words and cache_items must be >= 1")
        if self.batch_size < 1 or self.workers < 1 or self.query_cache < 0 or self.batch_wait_ms < 0:
            raise ValueError("batch_size and workers must be >= 1, query_cache and batch_wait_ms >= 0")
        if self.torch_threads < 0 or self.encoders < 0:
            raise ValueError(f"torch_threads and encoders must be >= 0, got {self.torch_threads}, {self.encoders}")
        unknown = set(self.upload_formats) - set(IMAGE_MEDIA_TYPES)
        if unknown:
            raise ValueError(f"upload_formats {sorted(unknown)} not supported; choose from {sorted(IMAGE_MEDIA_TYPES)}")


def _has_llm_text(model: Any) -> bool:
    """Whether ``model`` encodes text with the LLM encoder the fast path rewrites (LexVLA models do)."""
    from ..models.text import TextLexicalEncoder

    return isinstance(getattr(model, "text", None), TextLexicalEncoder) and hasattr(model, "mapper")


def decode_upload(data: bytes, config: WebConfig) -> Image.Image:
    """Bytes of an uploaded file -> RGB image, or :class:`UploadError` (413 too large, 415 not an
    accepted image type, 422 a broken image)."""
    if len(data) > config.max_upload_bytes:
        raise UploadError(f"upload is {len(data)} bytes; the limit is {config.max_upload_bytes}", 413)
    if not data:
        raise UploadError("upload is empty", 422)
    try:  # the one decoder: magic-byte format check and pixel cap from the header, then decode
        return decode_image(data, name="the upload", max_pixels=config.max_image_pixels,
                            formats=config.upload_formats)
    except ImageLoadError as err:
        if err.kind == "format":
            raise UploadError(f"upload is not an accepted image ({err}); accepted types: "
                              f"{', '.join(config.upload_formats)}", 415) from None
        raise UploadError(str(err), 413 if err.kind == "too_large" else 422) from None


class _LRU:
    """A small thread-safe LRU cache of computed values."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = compute()  # outside the lock: two racing requests compute twice, harmlessly
        with self._lock:
            self._data[key] = value
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return value


class QueryBatcher:
    """Encodes the query texts of concurrent requests together: one model call for up to ``batch_size``.

    A request hands its text to :meth:`encode` and waits. One encoder thread takes the first text of
    the queue and, while other searches are in flight (``expect`` says how many), waits at most
    ``wait_s`` for more before it runs the model, so a lone request never waits. Each text's vector
    is its own row of the batch's output (the model encodes rows independently).
    """

    def __init__(self, encode: Callable[[list[str]], Any], batch_size: int, wait_s: float,
                 expect: Callable[[], int] = lambda: 1, init: Callable[[], None] | None = None,
                 threads: int = 1) -> None:
        self._encode = encode
        self._init = init
        self.batch_size = batch_size
        self.wait_s = wait_s
        self._expect = expect
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.batches = 0  # model calls made (for tests and logs)
        self.encoded = 0  # texts encoded
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"lexvla-query-encoder-{i}", daemon=True)
                         for i in range(max(threads, 1))]
        for t in self._threads:
            t.start()

    def encode(self, text: str) -> Any:
        done: Future = Future()
        self._queue.put((text, done))
        return done.result()

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def _run(self) -> None:
        if self._init is not None:
            self._init()
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._expect() <= len(batch):  # nobody else is coming
                        break
                    try:
                        item = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                if item is None:  # closed while collecting: finish this batch, then stop
                    self._queue.put(None)  # (this thread's stop marker goes back for its next get)
                    break
                batch.append(item)
            texts = list(dict.fromkeys(t for t, _ in batch))
            try:
                rows = self._encode(texts)
                by_text = {t: rows[i] for i, t in enumerate(texts)}
                with self._lock:
                    self.batches += 1
                    self.encoded += len(texts)
                for t, done in batch:
                    done.set_result(by_text[t])
            except BaseException as err:  # noqa: BLE001 - every waiting request gets the error
                for _, done in batch:
                    done.set_exception(err)


@dataclass
class SearchResult:
    """Hits of one query (images, and captions when the index holds a caption collection)."""

    kind: str  # "text" or "image"
    query: str
    query_words: list[tuple[str, float]]
    hits: list[Hit]
    captions: list[Hit] = field(default_factory=list)
    seconds: float = 0.0


class SearchService:
    """A model and the index built with it; thread-safe for the web server's worker threads."""

    def __init__(self, model: Any, index: SparseIndex, config: WebConfig | None = None,
                 model_name: str = "") -> None:
        index.check_model(model)  # refuse to serve an index with the wrong model, with a clear message
        self.model = model
        self.index = index
        self.config = config or WebConfig()
        self.model_name = model_name or getattr(getattr(model, "config", None), "name", "") or "model"
        self._index_lock = threading.Lock()  # backends and store caches are not made for concurrent use
        self._render_lock = threading.Lock()  # matplotlib's font/text caches are shared state
        self._explanations = _LRU(self.config.cache_items)
        self._pictures = _LRU(self.config.cache_items * 3)
        self._query_vectors = _LRU(max(self.config.query_cache, 1))
        self.has_captions = index.has_collection("texts")
        self._fast_text = None
        if self.config.fast_encode and _has_llm_text(model):
            from ..models.text_fast import FastTextEncoder

            self._fast_text = FastTextEncoder(model.text)
            if not self._fast_text.agrees():  # a text-side feature the fast path does not know: stay exact
                logger.warning("the fast query encode does not match the model's own encode; using the plain one")
                self._fast_text = None
        with self._index_lock:
            index.sync()  # loads what searches read (postings, stored vectors, ids) now, not at the first query
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="lexvla-web",
                                       initializer=self._pin_threads)
        encoders = self.config.encoders or max(1, min(4, (os.cpu_count() or 1) // max(self.config.torch_threads, 1)))
        self.batcher = QueryBatcher(self._encode_texts, self.config.batch_size, self.config.batch_wait_ms / 1000,
                                    expect=lambda: self._in_flight, init=self._pin_threads, threads=encoders)

    def _pin_threads(self) -> None:
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)

    def close(self) -> None:
        """Stop the worker threads (the index is the caller's to close)."""
        self.batcher.close()
        self.pool.shutdown(wait=False)

    def _encode_texts(self, texts: list[str]) -> list[Any]:
        """Texts -> their query vectors (1 x V CSR rows), sparsified as the index does, in one model call."""
        with torch.inference_mode():
            if self._fast_text is not None:
                vectors = self.model.mapper.text(self._fast_text.scores(texts))
            else:
                vectors = self.model.encode_text(texts, batch_size=max(len(texts), 1)).vectors
        q = self.index.prepare_queries(vectors)
        return [q[i] for i in range(q.shape[0])]

    def text_vector(self, text: str) -> Any:
        """A query text's vector: from the cache, else encoded (batched with concurrent queries)."""
        if self.config.query_cache == 0:
            return self.batcher.encode(text)
        return self._query_vectors.get_or_compute(text, lambda: self.batcher.encode(text))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn`` on the bounded worker pool, counting it as in flight (the batcher's hint)."""
        def run() -> Any:
            with self._in_flight_lock:
                self._in_flight += 1
            try:
                return fn(*args)
            finally:
                with self._in_flight_lock:
                    self._in_flight -= 1

        return self.pool.submit(run)

    # -- items --------------------------------------------------------------------------------------
    def n_items(self) -> int:
        return self.index.store("images").n_alive

    def item(self, item_id: str) -> dict:
        """``{"id", <metadata>}`` of a live image item; :class:`NotFound` otherwise."""
        with self._index_lock:
            store = self.index.store("images")
            row = store.row_of(item_id)
            if row is None:
                raise NotFound(f"no image with id {item_id!r} in the index")
            return dict(store.items()[row])

    def image_file(self, item_id: str) -> tuple[Path, str]:
        """Path (from the index, never from the client) and media type of an item's image."""
        item = self.item(item_id)
        path = Path(str(item.get("path", "")))
        if not path.is_file():
            raise NotFound(f"the image file of {item_id!r} is no longer at the path recorded in the index")
        try:
            with Image.open(path) as img:
                media = IMAGE_MEDIA_TYPES.get(img.format or "", "")
        except (UnidentifiedImageError, OSError):
            media = ""
        if not media:
            raise NotFound(f"the file of {item_id!r} is not a servable image")
        return path, media

    # -- search -------------------------------------------------------------------------------------
    def _check_k(self, k: int | None) -> int:
        k = self.config.default_k if k is None else int(k)
        if not 1 <= k <= self.config.max_k:
            raise ValueError(f"k must be between 1 and {self.config.max_k}, got {k}")
        return k

    def _query_words(self, q: Any) -> list[tuple[str, float]]:
        q = self.index.prepare_queries(q)
        order = q.data.argsort()[::-1][:20]
        return [(self.index.vocab.words[int(q.indices[j])], float(q.data[j])) for j in order]

    def _words(self, all_words: bool) -> int | None:
        return None if all_words else self.config.tile_words

    def search_text(self, text: str, k: int | None = None, all_words: bool = False) -> SearchResult:
        """Text -> images. Hits carry the shown number of words (``tile_words``) unless ``all_words``."""
        text = " ".join(text.split())
        if not text:
            raise ValueError("the query is empty")
        if len(text) > self.config.max_query_chars:
            raise ValueError(f"the query has {len(text)} characters; the limit is {self.config.max_query_chars}")
        k = self._check_k(k)
        t0 = time.perf_counter()
        q = self.text_vector(text)
        with self._index_lock:
            hits = self.index.search_vectors(q, k, words=self._words(all_words))[0]
            words = self._query_words(q)
        return SearchResult("text", text, words, hits, seconds=time.perf_counter() - t0)

    def search_image(self, image: Image.Image, k: int | None = None, name: str = "upload",
                     all_words: bool = False) -> SearchResult:
        k = self._check_k(k)
        t0 = time.perf_counter()
        with torch.inference_mode():
            vectors = self.model.encode_image([image]).vectors
        n = self._words(all_words)
        with self._index_lock:
            q = self.index.prepare_queries(vectors)
            hits = self.index.search_vectors(q, k, words=n)[0]
            captions = self.index.search_vectors(q, min(k, 10), "texts", words=n)[0] if self.has_captions else []
            words = self._query_words(q)
        return SearchResult("image", name, words, hits, captions, time.perf_counter() - t0)

    # -- explanations and pictures ------------------------------------------------------------------
    def explain(self, item_id: str, query: str | None = None):
        """:class:`lexvla.viz.ImageExplanation` of an item (with the query's heat map when given)."""
        from ..viz import explain_image

        query = " ".join((query or "").split())
        if len(query) > self.config.max_query_chars:
            raise ValueError(f"the query has {len(query)} characters; the limit is {self.config.max_query_chars}")
        path, _ = self.image_file(item_id)

        def compute():
            with torch.no_grad():
                return explain_image(self.model, path, [query] if query else [], model_name=self.model_name)

        return self._explanations.get_or_compute((item_id, query), compute)

    def picture(self, item_id: str, kind: str, query: str | None = None) -> bytes:
        """PNG bytes of ``kind`` in :data:`PICTURES` for an item (cached)."""
        try:
            draw = PICTURES[kind]
        except KeyError:
            raise ValueError(f"unknown picture {kind!r}; available: {sorted(PICTURES)}") from None
        query = " ".join((query or "").split())
        if kind == "heatmap" and not query:
            raise ValueError("a heat map needs a text query (q)")
        # Any cached explanation of the item serves its word cloud and patch words; with a query, the
        # one the explain endpoint just computed (so opening an item encodes its image once).
        expl = self.explain(item_id, query)

        def compute() -> bytes:
            buf = io.BytesIO()
            with self._render_lock:
                draw(expl, buf)
            return buf.getvalue()

        return self._pictures.get_or_compute((item_id, kind, query if kind == "heatmap" else ""), compute)


def _draw_word_cloud(expl, buf: io.BytesIO) -> None:
    from ..viz import word_cloud

    word_cloud(expl.words, buf, width=640, height=360)


def _draw_patches(expl, buf: io.BytesIO) -> None:
    from ..viz import patch_words_figure

    patch_words_figure(expl.image, expl.patch_words, expl.grid, buf, width_in=6.4)


def _draw_heatmap(expl, buf: io.BytesIO) -> None:
    from ..viz import text_heatmap

    match = expl.texts[0]
    text_heatmap(expl.image, match.patch_scores, buf, text=match.text, width_in=5.4)


# Pictures the app can draw for an item, by the name used in the API.
PICTURES: dict[str, Callable[[Any, io.BytesIO], None]] = {
    "wordcloud": _draw_word_cloud,
    "patches": _draw_patches,
    "heatmap": _draw_heatmap,
}
