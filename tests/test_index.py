"""Sparse index on raw vectors: every backend against a dense torch reference, explanations, add/delete,
model refusal, crash safety of the store. Backends run for real (Seismic, Milvus Lite)."""

from __future__ import annotations

import json
import mmap
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from lexvla.index import (
    ModelMismatchError,
    ModelRecord,
    SparseIndex,
    VectorStore,
    list_backends,
)
from lexvla.sparsification import Sparsification
from lexvla.vocab import Vocabulary

V, N_DOCS, N_QUERIES, K = 400, 600, 25, 10
ALL_BACKENDS = list_backends()  # every registered backend is tested, not a hand-written list
APPROXIMATE_OR_SERVER = [b for b in ALL_BACKENDS if b != "exact"]


def zipf_vectors(n: int, active: int, seed: int) -> np.ndarray:
    """Unit vectors, ``active`` words each drawn without replacement with Zipf word frequencies."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, V + 1)
    p = p[np.random.default_rng(0).permutation(V)]
    p /= p.sum()
    out = np.zeros((n, V), dtype=np.float32)
    for i in range(n):
        idx = rng.choice(V, active, replace=False, p=p)
        out[i, idx] = rng.lognormal(size=active)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def collection() -> tuple[np.ndarray, np.ndarray]:
    return zipf_vectors(N_DOCS, 30, seed=1), zipf_vectors(N_QUERIES, 8, seed=2)


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary([f"word{i}" for i in range(V)], list(range(V)))


def make_index(path, vocab, docs, fingerprint="fp-a", shards=3) -> SparseIndex:
    index = SparseIndex.create(path, vocab, ModelRecord("raw", fingerprint, vocab.fingerprint(), V))
    for part in np.array_split(np.arange(len(docs)), shards):  # several shards: exercises concatenation
        index.add(docs[part], [f"doc{i}" for i in part])
    return index


def dense_topk(queries: np.ndarray, docs: np.ndarray, k: int = K) -> torch.return_types.topk:
    return (torch.from_numpy(queries) @ torch.from_numpy(docs).T).topk(k, dim=1)


_MILVUS_PROBE: dict[str, str | None] = {}


def milvus_or_skip(tmp_dir) -> None:
    """Skip (with the reason) only when Milvus Lite itself cannot start here; probed once per session."""
    if "reason" not in _MILVUS_PROBE:
        _MILVUS_PROBE["reason"] = None
        try:
            from lexvla.index.backends.milvus import _import_pymilvus

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # milvus-lite imports the deprecated pkg_resources
                client = _import_pymilvus().MilvusClient(str(tmp_dir / "probe.db"))
            client.close()
        except ImportError as err:
            _MILVUS_PROBE["reason"] = f"pymilvus/milvus-lite not installed: {err}"
        except Exception as err:  # noqa: BLE001 - whatever stops the Lite server from starting
            _MILVUS_PROBE["reason"] = f"Milvus Lite cannot start on this machine: {type(err).__name__}: {err}"
    if _MILVUS_PROBE["reason"]:
        pytest.skip(_MILVUS_PROBE["reason"])


@pytest.fixture(scope="module")
def built(tmp_path_factory, vocab, collection):
    path = tmp_path_factory.mktemp("idx")
    make_index(path, vocab, collection[0]).close()
    return path


def open_backend(path, name) -> SparseIndex:
    if name == "milvus":
        milvus_or_skip(path)
    return SparseIndex.open(path, backend=name)


def test_registry_lists_the_three_backends():
    assert {"exact", "seismic", "milvus"} <= set(list_backends())
    with pytest.raises(ValueError, match="unknown search backend 'nope'"):
        from lexvla.index import create_backend

        create_backend("nope", None)


def test_exact_equals_dense_reference(built, collection):
    docs, queries = collection
    ref = dense_topk(queries, docs)
    with SparseIndex.open(built) as index:
        hits = index.search_vectors(queries, k=K)
    for i, row in enumerate(hits):
        assert [h.row for h in row] == ref.indices[i].tolist()
        np.testing.assert_allclose([h.score for h in row], ref.values[i].numpy(), rtol=1e-5, atol=1e-6)
        assert [h.id for h in row] == [f"doc{r}" for r in ref.indices[i].tolist()]


@pytest.mark.parametrize("backend", APPROXIMATE_OR_SERVER)
def test_approximate_and_server_backends(built, collection, backend):
    docs, queries = collection
    ref = dense_topk(queries, docs).indices.numpy()
    with open_backend(built, backend) as index:
        hits = index.search_vectors(queries, k=K)
    recall = np.mean([len({h.row for h in row} & set(ref[i])) / K for i, row in enumerate(hits)])
    assert recall >= 0.95, f"{backend} recall@10 = {recall:.3f}"
    if backend == "milvus":  # SPARSE_INVERTED_INDEX + DAAT_MAXSCORE, drop_ratio 0: exact, same top-k
        assert [[h.row for h in row] for row in hits] == ref.tolist()
    # Hits are re-scored exactly: each returned score is the true dot product.
    dense = queries @ docs.T
    for i, row in enumerate(hits):
        for h in row:
            assert h.score == pytest.approx(float(dense[i, h.row]), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_explanations_sum_to_score(built, collection, vocab, backend):
    docs, queries = collection
    with open_backend(built, backend) as index:
        hits = index.search_vectors(queries[:5], k=5)
    for i, row in enumerate(hits):
        assert row, "every query shares words with some document"
        for h in row:
            contributions = [w.contribution for w in h.explanation.words]
            assert sum(contributions) == pytest.approx(h.score, rel=1e-9, abs=1e-12)
            assert contributions == sorted(contributions, reverse=True)
            for w in h.explanation.words:
                assert w.word == vocab.words[w.dim]
                assert w.query_weight == pytest.approx(float(queries[i, w.dim]), rel=1e-6)
                assert w.doc_weight == pytest.approx(float(docs[h.row, w.dim]), rel=1e-6)
            shared = np.flatnonzero((queries[i] > 0) & (docs[h.row] > 0))
            assert sorted(w.dim for w in h.explanation.words) == shared.tolist()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_add_and_delete(tmp_path, vocab, collection, backend):
    docs, queries = collection
    first, extra = docs[:400], docs[400:]
    make_index(tmp_path, vocab, first, shards=2).close()
    index = open_backend(tmp_path, backend)
    with index:
        index.search_vectors(queries[:2], k=K)  # backend built before the changes: must catch up
        index.add(extra, [f"doc{i}" for i in range(400, N_DOCS)])
        gone = [f"doc{r}" for r in dense_topk(queries[:5], docs).indices[:, 0].tolist()]
        index.delete(gone)
        alive = np.ones(N_DOCS, dtype=bool)
        alive[[int(g[3:]) for g in gone]] = False
        ref = (torch.from_numpy(queries) @ torch.from_numpy(docs).T)
        ref[:, ~torch.from_numpy(alive)] = -1
        ref_top = ref.topk(K, dim=1).indices.numpy()
        hits = index.search_vectors(queries, k=K)
        found = [{h.id for h in row} for row in hits]
        assert not set(gone) & set().union(*found)
        recall = np.mean([len({h.row for h in row} & set(ref_top[i])) / K for i, row in enumerate(hits)])
        assert recall >= (1.0 if backend == "exact" else 0.95)
        assert any(h.row >= 400 for row in hits for h in row), "added rows are searchable"
        with pytest.raises(ValueError, match="already in the store"):
            index.add(extra[:1], ["doc450"])
        with pytest.raises(KeyError, match="not in"):
            index.delete(["no-such-doc"])
        assert index.info().collections["images"]["items"] == N_DOCS - len(set(gone))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_backends_describe_themselves_and_never_save_secrets(tmp_path, vocab, collection, backend):
    """index.json keeps a backend's options minus its secrets; the index code needs no backend names."""
    from lexvla.index.backends import get_backend

    cls = get_backend(backend)
    secrets = {name: f"s3cret-{name}" for name in cls.secret_options()}
    index = SparseIndex.create(tmp_path, vocab, ModelRecord("raw", "fp", vocab.fingerprint(), V), backend=backend,
                               backend_options=secrets)
    index.add(collection[0][:50], [f"doc{i}" for i in range(50)])
    text = (tmp_path / "index.json").read_text()
    assert not any(v in text for v in secrets.values())
    defaults = cls.collection_defaults(index.meta["uid"], "images")
    assert set(defaults) <= cls.option_names()
    index.close()
    with open_backend(tmp_path, backend) as index:
        desc = index.backend("images").describe()
        assert desc["backend"] == backend
        assert not any(v in json.dumps(desc, default=str) for v in secrets.values())
        for key, value in defaults.items():
            assert desc["options"][key] == value


def test_search_builds_only_the_words_asked_for(built, collection):
    _, queries = collection
    with SparseIndex.open(built) as index:
        full = index.search_vectors(queries, k=K)
        cut = index.search_vectors(queries, k=K, words=3)
    for a, b in zip(full, cut):
        assert [h.row for h in a] == [h.row for h in b]
        for ha, hb in zip(a, b):
            assert hb.score == ha.score and hb.explanation.n_shared == len(ha.explanation.words)
            assert hb.explanation.words == ha.explanation.words[:3]
            assert hb.explanation.complete == (len(ha.explanation.words) <= 3)


def test_exact_ranks_reached_rows_when_few_scores_are_positive(tmp_path, vocab):
    """Negative weights: a row the query reaches with a negative score still ranks above unreached rows."""
    docs = np.zeros((30, V), dtype=np.float32)
    docs[:5, 0] = [0.5, 0.4, 0.3, -0.2, -0.1]
    docs[5:, 1] = 1.0
    query = np.zeros((1, V), dtype=np.float32)
    query[0, 0] = 1.0
    make_index(tmp_path, vocab, docs, shards=2).close()
    with SparseIndex.open(tmp_path) as index:
        rows = [h.row for h in index.search_vectors(query, k=K)[0]]
        index.delete(["doc1"])
        after = [h.row for h in index.search_vectors(query, k=K)[0]]
    assert rows == [0, 1, 2, 4, 3]
    assert after == [0, 2, 4, 3]


def test_milvus_sync_resumes_without_duplicates(tmp_path, vocab, collection):
    """A sync that died after inserting rows it had not yet recorded must not insert them twice."""
    docs, queries = collection
    make_index(tmp_path, vocab, docs[:200], shards=1).close()
    milvus_or_skip(tmp_path)
    with SparseIndex.open(tmp_path, backend="milvus", backend_options={"insert_batch": 50}) as index:
        index.backend()
        state_file = tmp_path / "images" / "milvus.json"
        state = json.loads(state_file.read_text())
        assert state["rows"] == 200
        state_file.write_text(json.dumps({**state, "rows": 120}))  # as if the last flushes never happened
    with SparseIndex.open(tmp_path, backend="milvus") as index:
        hits = index.search_vectors(queries, k=K)
        ref = dense_topk(queries, docs[:200]).indices.numpy()
        for i, row in enumerate(hits):
            ids = [h.id for h in row]
            assert len(ids) == len(set(ids)) == K
            assert [h.row for h in row] == ref[i].tolist()
        assert json.loads(state_file.read_text())["rows"] == 200


def test_wrong_model_is_refused(built, collection):
    _, queries = collection
    with SparseIndex.open(built) as index:
        with pytest.raises(ModelMismatchError, match="fp-a.*fp-other|built with model"):
            index.search_vectors(queries[:1], fingerprint="fp-other")
        with pytest.raises(ModelMismatchError, match="vocabulary"):
            index.check_fingerprint("fp-a", vocab_fingerprint="0000")
        index.search_vectors(queries[:1], fingerprint="fp-a")  # the right model passes
        with pytest.raises(ValueError, match="dimensions"):
            index.search_vectors(np.ones((1, V + 1), dtype=np.float32))


def is_memory_mapped(array) -> bool:
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = getattr(array, "base", None)
    return False


def test_reopen_is_memory_mapped_and_identical(built, collection):
    _, queries = collection
    with SparseIndex.open(built) as a:
        first = [[(h.id, h.score) for h in row] for row in a.search_vectors(queries, k=K)]
    with SparseIndex.open(built) as b:
        again = [[(h.id, h.score) for h in row] for row in b.search_vectors(queries, k=K)]
        postings = b.backend("images")._postings
        for array in (postings.data, postings.indices, postings.indptr):
            assert is_memory_mapped(array), "opened without reading the arrays into memory"
    assert first == again


def test_query_sparsification(tmp_path, vocab, collection):
    docs, queries = collection
    index = SparseIndex.create(tmp_path, vocab, ModelRecord("raw", "fp", vocab.fingerprint(), V),
                               Sparsification(threshold=0.05, topk=20))
    index.add(docs, [f"d{i}" for i in range(N_DOCS)])
    stored = index.store().matrix()
    assert stored.data.min() > 0.05 and np.diff(stored.indptr).max() <= 20
    q = index.prepare_queries(queries, "threshold:0.05,topk:3")
    assert np.diff(q.indptr).max() <= 3 and q.data.min() > 0.05
    hits = index.search_vectors(queries, k=3, sparsify=Sparsification(0.05, topk=3))
    for i, row in enumerate(hits):
        for h in row:
            assert len(h.explanation.words) <= 3
            assert h.score == pytest.approx(float((q[i].toarray() @ stored[h.row].toarray().T).item()), rel=1e-6)


def test_store_ignores_uncommitted_shard(tmp_path, collection):
    """A crash after writing shard files but before the manifest commit loses only that batch."""
    docs, _ = collection
    store = VectorStore.create(tmp_path, V)
    store.append(sp.csr_matrix(docs[:10]), [{"id": f"a{i}"} for i in range(10)])
    # The next shard's files, half written by a process that died before committing:
    (tmp_path / "shard-000001.data.npy").write_bytes(b"garbage")
    (tmp_path / "shard-000001.items.jsonl").write_text('{"id": "ghost"}\n')
    reopened = VectorStore.open(tmp_path)
    assert reopened.n_rows == 10 and reopened.row_of("ghost") is None
    reopened.append(sp.csr_matrix(docs[10:15]), [{"id": f"b{i}"} for i in range(5)])
    again = VectorStore.open(tmp_path)
    assert again.n_rows == 15 and again.ids()[10:] == [f"b{i}" for i in range(5)]
    np.testing.assert_allclose(again.matrix().toarray(), docs[:15], rtol=1e-6)
    assert json.loads((tmp_path / "manifest.json").read_text())["generation"] == 3


def test_bad_inputs_name_the_problem(tmp_path, vocab):
    index = SparseIndex.create(tmp_path, vocab, ModelRecord("raw", "fp", vocab.fingerprint(), V))
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((1, V), np.nan, dtype=np.float32), ["x"])
    with pytest.raises(ValueError, match="2 vectors but 1 items"):
        index.add(np.ones((2, V), dtype=np.float32), ["x"])
    with pytest.raises(ValueError, match="unknown collection"):
        index.store("audio")
    with pytest.raises(FileExistsError):
        SparseIndex.create(tmp_path, vocab, ModelRecord("raw", "fp", vocab.fingerprint(), V))
    with pytest.raises(FileNotFoundError, match="not a lexvla index"):
        SparseIndex.open(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no option"):
        SparseIndex.open(tmp_path, backend="seismic", backend_options={"bogus": 1}).backend()
    assert index.search_vectors(np.ones((1, V), dtype=np.float32)) == [[]]  # empty collection


def test_exact_in_place_kernel_matches_copying_the_postings(built, collection, monkeypatch):
    """The zero-copy accumulation over the memory-mapped postings equals the public-API path."""
    from lexvla.index.backends import exact

    _, queries = collection
    with SparseIndex.open(built) as index:
        fast = index.search_vectors(queries, k=K)
        monkeypatch.setattr(exact, "_csc_matvec", None)
        slow = index.search_vectors(queries, k=K)
    assert [[h.row for h in r] for r in fast] == [[h.row for h in r] for r in slow]
    assert [[h.score for h in r] for r in fast] == [[h.score for h in r] for r in slow]
