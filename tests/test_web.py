"""Web app API on lexvla-tiny and a small generated index: search, explain, pictures, input validation."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # fastapi.testclient

from fastapi.testclient import TestClient  # noqa: E402

from lexvla.index import SparseIndex, build_index  # noqa: E402
from lexvla.web import SearchService, WebConfig, create_app  # noqa: E402

SHAPES = {"red-circle": ((220, 30, 30), "ellipse"), "blue-square": ((30, 30, 210), "rectangle"),
          "green-circle": ((30, 180, 40), "ellipse"), "yellow-square": ((230, 210, 30), "rectangle"),
          "gray-circle": ((120, 120, 120), "ellipse")}


def make_collection(folder) -> dict[str, object]:
    """Images of coloured shapes (one in a sub-folder, so one id has a slash) + captions."""
    paths = {}
    for i, (name, (color, shape)) in enumerate(SHAPES.items()):
        img = Image.new("RGB", (80 + 8 * i, 64), (245, 245, 245))
        getattr(ImageDraw.Draw(img), shape)((10 + i, 8, 58 + i, 56), fill=color)
        sub = folder / ("more" if i == 4 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / (f"{name}.jpg" if i % 2 else f"{name}.png")
        img.save(path)
        paths[path.relative_to(folder).as_posix()] = path
    return paths


@pytest.fixture(scope="module")
def web_index(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("web")
    paths = make_collection(root / "images")
    captions = root / "captions.txt"
    captions.write_text("a red circle\na blue square\na green circle on white\n")
    build_index(tiny_model, root / "images", out=root / "idx", captions=captions, progress=False, batch_size=2)
    return root / "idx", paths


@pytest.fixture(scope="module")
def service(web_index, tiny_model):
    index = SparseIndex.open(web_index[0])
    # tile_words large enough to list every shared word, so sums can be checked against scores
    svc = SearchService(tiny_model, index, WebConfig(max_upload_bytes=64 * 1024, max_image_pixels=200_000,
                                                     tile_words=100_000, default_k=4))
    yield svc
    index.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


def png_bytes(size=(64, 48), color=(220, 30, 30)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, (245, 245, 245))
    ImageDraw.Draw(img).ellipse((5, 5, size[0] - 5, size[1] - 5), fill=color)
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_info_and_page(client):
    info = client.get("/api/info").json()
    assert info["items"] == len(SHAPES) and info["captions"] is True and info["max_k"] == 100
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text
    assert "searchText" in client.get("/static/app.js").text
    schema = client.get("/api/openapi.json").json()
    assert {"/api/search", "/api/search/image", "/api/explain", "/api/image", "/api/picture"} <= set(schema["paths"])


def test_text_search_matches_the_index_and_explanations_sum_to_scores(client, service, tiny_model):
    res = client.get("/api/search", params={"q": "a red circle", "k": 3})
    assert res.status_code == 200
    data = res.json()
    direct = service.index.search_text(tiny_model, "a red circle", 3)[0]
    assert [h["id"] for h in data["hits"]] == [h.id for h in direct]
    scores = [h["score"] for h in data["hits"]]
    assert scores == sorted(scores, reverse=True)
    for hit, ref in zip(data["hits"], direct):
        # the service encodes with the fast path (merged LoRA, cached prompt prefix): float rounding apart
        assert hit["score"] == pytest.approx(ref.score, rel=1e-6)
        assert len(hit["words"]) == hit["n_shared_words"] > 0
        assert sum(w["contribution"] for w in hit["words"]) == pytest.approx(hit["score"], rel=1e-6)
        for w in hit["words"]:
            assert w["contribution"] == pytest.approx(w["query_weight"] * w["doc_weight"], rel=1e-6)
        assert hit["image_url"].startswith("/api/image?id=")
    assert data["query_words"] and data["items"] == len(SHAPES)
    assert len(client.get("/api/search", params={"q": "circle"}).json()["hits"]) == 4  # default_k


@pytest.mark.parametrize("params", [{"q": ""}, {"q": "   "}, {"q": "x" * 301}, {"q": "dog", "k": 0},
                                    {"q": "dog", "k": 101}, {"q": "dog", "k": "many"}, {}])
def test_text_search_rejects_bad_queries(client, params):
    res = client.get("/api/search", params=params)
    assert res.status_code == 422, res.text
    assert res.json()["detail"]


def test_images_are_served_by_id_only(client, web_index):
    _, paths = web_index
    for item_id, path in paths.items():
        res = client.get("/api/image", params={"id": item_id})
        assert res.status_code == 200
        assert res.content == path.read_bytes()
        assert res.headers["content-type"] == ("image/png" if path.suffix == ".png" else "image/jpeg")
    meta = client.get("/api/item", params={"id": "more/gray-circle.png"}).json()
    assert meta["id"] == "more/gray-circle.png" and "path" not in meta
    secret = str(next(iter(paths.values())))
    for bad in ["../../../../etc/passwd", "/etc/passwd", secret, "more/../red-circle.png", "..%2f..%2fetc%2fpasswd",
                "red-circle.png\x00.jpg", ""]:
        for url in ("/api/image", "/api/item", "/api/explain"):
            res = client.get(url, params={"id": bad})
            assert res.status_code == 404, (url, bad, res.status_code)
    # no file outside the static folder through the static route, however the path is spelled
    for raw in ["/static/../service.py", "/static/%2e%2e/service.py", "/static/..%2fservice.py",
                "/static/%2e%2e/%2e%2e/index/core.py", "/static//etc/passwd"]:
        res = client.get(raw)
        assert res.status_code == 404, (raw, res.status_code)
        assert b"SearchService" not in res.content and b"root:" not in res.content


def test_image_upload_search(client, service, tiny_model, web_index):
    _, paths = web_index
    path = paths["red-circle.png"]
    res = client.post("/api/search/image", params={"k": 3},
                      files={"file": ("query.png", path.read_bytes(), "image/png")})
    assert res.status_code == 200, res.text
    data = res.json()
    direct = service.index.search_image(tiny_model, path, 3)[0]
    assert [h["id"] for h in data["hits"]] == [h.id for h in direct]
    assert data["kind"] == "image" and data["query"] == "query.png"
    assert data["captions"] and all(c["text"] for c in data["captions"])
    for hit in data["hits"] + data["captions"]:
        assert sum(w["contribution"] for w in hit["words"]) == pytest.approx(hit["score"], rel=1e-6)
    # the type comes from the bytes: a PNG declared as text with a .txt name is still a PNG
    res = client.post("/api/search/image", files={"file": ("q.txt", path.read_bytes(), "text/plain")})
    assert res.status_code == 200


@pytest.mark.parametrize("name,payload,ctype,status", [
    ("notes.png", b"this is not an image at all" * 10, "image/png", 415),
    ("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "image/svg+xml", 415),
    ("x.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "application/pdf", 415),
    ("empty.png", b"", "image/png", 422),
    ("truncated.png", None, "image/png", 422),
    ("big.png", None, "image/png", 413),
    ("huge.png", None, "image/png", 413),
    ("bomb.png", None, "image/png", 413),
])
def test_upload_validation(client, name, payload, ctype, status):
    if name == "truncated.png":
        payload = png_bytes((200, 150))[:300]
    elif name == "big.png":  # over the 64 KiB limit but within the multipart slack: caught after reading
        payload = png_bytes() + b"\0" * (70 * 1024)
    elif name == "huge.png":  # far over: refused from Content-Length before reading
        payload = png_bytes() + b"\0" * (300 * 1024)
    elif name == "bomb.png":  # small file, too many pixels (limit 200,000 in this test)
        buf = io.BytesIO()
        Image.new("1", (1000, 1000)).save(buf, format="PNG")
        payload = buf.getvalue()
        assert len(payload) < 64 * 1024
    res = client.post("/api/search/image", files={"file": (name, payload, ctype)})
    assert res.status_code == status, (name, res.status_code, res.text)
    assert isinstance(res.json()["detail"], str | list)


def test_upload_without_a_file_or_length_is_refused(client):
    assert client.post("/api/search/image").status_code == 422
    res = client.post("/api/search/image", content=iter([b"--x\r\n"]),  # a generator: chunked, no length
                      headers={"content-type": "multipart/form-data; boundary=x"})
    assert res.status_code == 411


def test_explain_and_pictures(client, service):
    item_id = "more/gray-circle.png"
    res = client.get("/api/explain", params={"id": item_id, "q": "a gray circle"})
    assert res.status_code == 200, res.text
    ex = res.json()
    rows, cols = ex["grid"]
    assert len(ex["patch_words"]) == rows * cols
    assert np.asarray(ex["query"]["patch_scores"]).shape == (rows, cols)
    shared = [w["weight"] for w in ex["query"]["shared_words"]]
    assert shared == sorted(shared, reverse=True)
    assert ex["words"][0]["weight"] >= ex["words"][-1]["weight"] > 0
    for url in (ex["wordcloud_url"], ex["patches_url"], ex["query"]["heatmap_url"]):
        pic = client.get(url)
        assert pic.status_code == 200 and pic.headers["content-type"] == "image/png", url
        assert Image.open(io.BytesIO(pic.content)).size[0] > 100
    plain = client.get("/api/explain", params={"id": item_id}).json()
    assert plain["query"] is None and plain["words"] == ex["words"]
    assert client.get("/api/picture", params={"id": item_id, "kind": "heatmap"}).status_code == 422
    assert client.get("/api/picture", params={"id": item_id, "kind": "../../x"}).status_code == 422
    assert client.get("/api/picture", params={"id": "nope", "kind": "patches"}).status_code == 404


def test_serve_command_binds_loopback_by_default():
    from lexvla.web.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "idx"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)  # None: the index's own model


def test_web_config_is_validated():
    with pytest.raises(ValueError, match="default_k"):
        WebConfig(default_k=0)
    with pytest.raises(ValueError, match="upload_formats"):
        WebConfig(upload_formats=("SVG",))
    assert json.loads(json.dumps(WebConfig().__dict__))  # plain values only


def test_page_headers_and_host_check_against_dns_rebinding(service, client):
    page = client.get("/")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    with TestClient(create_app(service, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1") as c:
        assert c.get("/api/info").status_code == 200
        assert c.get("/api/info", headers={"host": "evil.example:8000"}).status_code == 400
        assert c.get("/api/search", params={"q": "dog"}, headers={"host": "rebind.attacker.test"}).status_code == 400


QUERIES = ["a red circle", "blue square", "a green circle on white", "gray", "yellow square", "a circle"]


def _hits(res):
    return [(h.id, h.score, [(w.word, w.contribution) for w in h.explanation.words]) for h in res.hits]


@pytest.mark.parametrize("single_fast", [True, False], ids=["single-fast", "single-plain"])
def test_batched_queries_return_what_single_ones_do(web_index, tiny_model, single_fast):
    """Concurrent text queries encoded in one model call give the same hits, ranks and words as one by
    one, whether the lone queries take the fast encode path or the plain (training) one."""
    from concurrent.futures import ThreadPoolExecutor

    index = SparseIndex.open(web_index[0])
    single = SearchService(tiny_model, index, WebConfig(query_cache=0, batch_size=1, default_k=4,
                                                        fast_encode=single_fast))
    assert (single._fast_text is not None) == single_fast
    batched = SearchService(tiny_model, index, WebConfig(query_cache=0, batch_size=8, batch_wait_ms=2000,
                                                         default_k=4, encoders=1))
    batched.batcher._expect = lambda: len(QUERIES)  # wait for all of them: one batch, deterministically
    try:
        alone = [_hits(single.search_text(q)) for q in QUERIES]
        with ThreadPoolExecutor(len(QUERIES)) as pool:
            together = [_hits(r) for r in pool.map(batched.search_text, QUERIES)]
        assert batched.batcher.batches == 1 and batched.batcher.encoded == len(QUERIES)
        assert single.batcher.batches == len(QUERIES)
        # Same hits in the same order with the same words; numbers equal to float32 rounding (a batched
        # matrix product rounds the last bit differently from a one-row one: ~1e-8 on weights ~0.06).
        for t, a in zip(together, alone):
            assert [h[0] for h in t] == [h[0] for h in a]
            for (_, ts, tw), (_, as_, aw) in zip(t, a):
                assert ts == pytest.approx(as_, rel=1e-6)
                assert [w for w, _ in tw] == [w for w, _ in aw]
                np.testing.assert_allclose([c for _, c in tw], [c for _, c in aw], rtol=1e-5)
    finally:
        single.close()
        batched.close()
        index.close()


def test_query_vectors_are_cached_and_only_shown_words_are_built(web_index, tiny_model):
    index = SparseIndex.open(web_index[0])
    svc = SearchService(tiny_model, index, WebConfig(tile_words=2, default_k=4))
    try:
        with TestClient(create_app(svc)) as c:
            short = c.get("/api/search", params={"q": "a red circle"}).json()
            full = c.get("/api/search", params={"q": "a red circle", "all_words": "true"}).json()
        assert svc.batcher.encoded == 1, "the second request reuses the cached query vector"
        assert [h["id"] for h in short["hits"]] == [h["id"] for h in full["hits"]]
        for s, f in zip(short["hits"], full["hits"]):
            assert len(s["words"]) == min(2, f["n_shared_words"]) and s["n_shared_words"] == f["n_shared_words"]
            assert len(f["words"]) == f["n_shared_words"]
            assert s["words"] == f["words"][:2] and s["score"] == f["score"]
            assert sum(w["contribution"] for w in f["words"]) == pytest.approx(f["score"], rel=1e-6)
    finally:
        svc.close()
        index.close()


def test_serve_uses_the_model_the_index_records(tmp_path, tiny_model):
    from lexvla._cli import ModelSpec
    from lexvla.index import SparseIndex
    from lexvla.web.cli import model_spec

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 20, 20)).save(folder / "red.png")
    recorded = "lexvla-tiny mapper.margin=2.0"  # the spelling `lexvla index build --model ...` was given
    build_index(tiny_model, folder, out=tmp_path / "idx", progress=False, model_source=recorded)
    with SparseIndex.open(tmp_path / "idx") as index:
        assert model_spec(None, index) == ModelSpec("lexvla-tiny", (("mapper.margin", 2.0),))
        assert model_spec(ModelSpec("other"), index).name == "other"  # --model wins
    build_index(tiny_model, folder, out=tmp_path / "bare", progress=False)
    with SparseIndex.open(tmp_path / "bare") as index, pytest.raises(ValueError, match="pass --model"):
        model_spec(None, index)
