"""The backend interface, its registry and the helpers backends share (top-k, state files, quiet stdout).

A backend describes itself to the index through class methods, so ``index/core.py`` needs no backend
names: which option values may be written to ``index.json`` (:meth:`SearchBackend.options_to_save`:
secrets such as tokens are marked ``metadata={"secret": True}`` on their dataclass field and never
saved), what a collection's defaults are (:meth:`SearchBackend.collection_defaults`, e.g. a Milvus
collection name derived from the index's id) and, once created, where its data lives
(:meth:`SearchBackend.describe`).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from lexvla.index.store import VectorStore


@dataclass
class Candidates:
    """Rows found for one query, best first, with the backend's own scores."""

    rows: np.ndarray  # int64
    scores: np.ndarray  # float32

    @classmethod
    def empty(cls) -> Candidates:
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))


class SearchBackend(abc.ABC):
    """Interface of a search backend. Subclasses declare ``name`` and an ``Options`` dataclass."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = object

    def __init__(self, store: VectorStore, options: Any) -> None:
        self.store = store
        self.options = options

    # -- self-description (used by the index, which knows no backend by name) -----------------------
    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls.Options)}

    @classmethod
    def secret_options(cls) -> set[str]:
        """Options never written anywhere (credentials): fields with ``metadata={"secret": True}``."""
        return {f.name for f in dataclasses.fields(cls.Options) if f.metadata.get("secret")}

    @classmethod
    def options_to_save(cls, options: dict) -> dict:
        """The options as recorded in ``index.json``: unset values and secrets left out.

        Backends override this to make values valid from any working folder (e.g. absolute paths).
        """
        secret = cls.secret_options()
        return {k: v for k, v in options.items() if k not in secret and v is not None}

    @classmethod
    def collection_defaults(cls, index_uid: str, collection: str) -> dict:
        """Options a collection of index ``index_uid`` gets unless given (e.g. a server-side name)."""
        return {}

    def describe(self) -> dict:
        """What this backend is and where its data lives (no secrets), for ``index info`` and logs."""
        secret = self.secret_options()
        opts = {k: v for k, v in dataclasses.asdict(self.options).items() if k not in secret}
        return {"backend": self.name, "options": opts, "disk_bytes": self.disk_bytes()}

    # -- searching ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def sync(self) -> None:
        """Bring the backend's copy up to date with the store."""

    @abc.abstractmethod
    def search(self, queries: sp.csr_matrix, k: int) -> list[Candidates]:
        """Top-``k`` live rows per query row (queries: (B, V) CSR float32). Call after :meth:`sync`."""

    def disk_bytes(self) -> int:
        """Bytes this backend keeps on disk beside the store (0 when nothing local)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook: backends without resources need nothing
        """Release files, handles and child processes."""

    def __enter__(self) -> SearchBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BACKENDS: dict[str, type[SearchBackend]] = {}


def register_backend(name: str) -> Callable[[type[SearchBackend]], type[SearchBackend]]:
    """Class decorator adding a backend to :data:`BACKENDS` under ``name``."""

    def deco(cls: type[SearchBackend]) -> type[SearchBackend]:
        if name in BACKENDS:
            raise ValueError(f"backend {name!r} is already registered")
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return deco


def list_backends() -> list[str]:
    return sorted(BACKENDS)


def get_backend(name: str) -> type[SearchBackend]:
    """The registered backend class ``name`` (a clear error listing the others otherwise)."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown search backend {name!r}; available: {', '.join(list_backends())}") from None


def create_backend(name: str, store: VectorStore, options: dict | None = None) -> SearchBackend:
    """Instantiate backend ``name`` over ``store``; ``options`` are its ``Options`` fields."""
    cls = get_backend(name)
    fields = cls.option_names()
    unknown = sorted(set(options or {}) - fields)
    if unknown:
        raise ValueError(f"backend {name!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    return cls(store, cls.Options(**(options or {})))


# -- helpers ---------------------------------------------------------------------------------------
def read_state(path: Path) -> dict:
    """A backend's state file; a damaged one reads as empty, so the backend rebuilds (derived data)."""
    try:
        state = json.loads(path.read_bytes().decode("utf-8")) if path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        logging.getLogger(__name__).warning("ignoring damaged %s (the backend rebuilds its files)", path)
        return {}
    return state if isinstance(state, dict) else {}


def topk_rows(cols: np.ndarray, vals: np.ndarray, k: int) -> Candidates:
    """The ``k`` largest ``vals`` (ties broken by smaller row), best first."""
    if len(vals) > k:
        part = np.argpartition(-vals, k - 1)[:k]
        cols, vals = cols[part], vals[part]
    order = np.lexsort((cols, -vals))
    return Candidates(cols[order].astype(np.int64), vals[order].astype(np.float32))


def kth_largest(scores: np.ndarray, k: int, block: int = 1024) -> float:
    """The ``k``-th largest value of a dense vector, reading it about once.

    The maxima of fixed blocks bound where it can be: every value above the ``k``-th largest block
    maximum lies in one of the ``k`` blocks with the largest maxima, so only those blocks are partitioned
    (for N = 1M: 10 blocks of 1024 instead of a million values).
    """
    n = len(scores)
    if n <= k:
        return float(scores.min()) if n else float("-inf")
    nb = n // block
    if nb <= k:
        return float(-np.partition(-scores, k - 1)[k - 1])
    maxima = scores[:nb * block].reshape(nb, block).max(axis=1)
    blocks = np.argpartition(-maxima, k - 1)[:k]
    cand = np.concatenate([scores[:nb * block].reshape(nb, block)[blocks].ravel(), scores[nb * block:]])
    return float(-np.partition(-cand, k - 1)[k - 1])


def dense_topk(scores: np.ndarray, k: int) -> Candidates:
    """The ``k`` largest positive entries of a dense score vector (ties broken by smaller row), best first.

    Rows scoring 0 or less are not returned (a row no query word reaches is not a match).
    """
    kth = max(kth_largest(scores, k), np.finfo(np.float32).tiny)
    rows = np.flatnonzero(scores >= kth)
    return topk_rows(rows, scores[rows], k)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence native code that prints progress to file descriptor 1 (keeps ``--json`` output clean)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (some embedded runners): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
