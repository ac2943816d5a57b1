"""Search backends over a :class:`~lexvla.index.store.VectorStore`, chosen by name from a registry.

Every backend answers "which rows score highest against these sparse queries"; the index then
re-scores those rows exactly from the stored vectors and explains them, so scores and explanations do
not depend on the backend. The store is the source of truth: a backend keeps its own copy (postings
file, Seismic index, Milvus collection) and :meth:`SearchBackend.sync` brings it up to date after rows
were added or deleted (cheap when nothing changed).

One backend per module, each registered with :func:`register_backend`; the backend describes itself
(which options are secrets and never saved, which need resolving before they are saved, what a
collection's defaults are), so the index code holds no backend names:

- ``exact`` (:mod:`.exact`): the transposed store (postings) memory-mapped; each query gathers the
  postings of its words and accumulates scores densely; exact.
- ``seismic`` (:mod:`.seismic`): approximate search with Seismic (``pyseismic-lsr``).
- ``milvus`` (:mod:`.milvus`): a Milvus collection (Milvus Lite file or a server/cluster by URI).
"""

from lexvla.index.backends.base import (
    BACKENDS,
    Candidates,
    SearchBackend,
    create_backend,
    dense_topk,
    get_backend,
    list_backends,
    register_backend,
    topk_rows,
)

# Importing the modules registers their backends (one module per backend).
from lexvla.index.backends import exact as _exact  # noqa: E402,F401  isort: skip
from lexvla.index.backends import seismic as _seismic  # noqa: E402,F401  isort: skip
from lexvla.index.backends import milvus as _milvus  # noqa: E402,F401  isort: skip

__all__ = ["BACKENDS", "Candidates", "SearchBackend", "create_backend", "dense_topk", "get_backend",
           "list_backends", "register_backend", "topk_rows"]
