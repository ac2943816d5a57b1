"""Sparse lexical index and explained search.

Vectors live in an append-only on-disk store (``store.py``); a backend chosen by name (``exact``,
``seismic``, ``milvus``; one module each in ``backends/``) proposes the top rows; every hit is re-scored from the
stored vectors and explained word by word (``explain.py``). ``build.py`` encodes image folders and
caption files with a model, resumably.
"""

from lexvla.index.backends import (
    BACKENDS,
    Candidates,
    SearchBackend,
    create_backend,
    list_backends,
    register_backend,
)
from lexvla.index.build import BuildReport, SkippedItem, build_index, collect_images, read_captions
from lexvla.index.core import (
    COLLECTIONS,
    IndexInfo,
    ModelMismatchError,
    ModelRecord,
    SparseIndex,
    to_csr,
)
from lexvla.index.explain import Explanation, Hit, WordContribution
from lexvla.index.store import VectorStore
from lexvla.sparsification import Sparsification

__all__ = [
    "BACKENDS", "COLLECTIONS", "BuildReport", "Candidates", "Explanation", "Hit", "IndexInfo", "ModelMismatchError",
    "ModelRecord", "SearchBackend", "SkippedItem", "SparseIndex", "Sparsification", "VectorStore",
    "WordContribution", "build_index", "collect_images", "create_backend", "list_backends", "read_captions",
    "register_backend", "to_csr",
]
