"""Batched encoding with a progress bar, a sparsification setting, and an on-disk vector cache.

Works for any model object with ``encode_image(list_of_paths)`` / ``encode_text(list_of_str)`` that
return something with a ``.vectors`` (N, D) tensor (a LexVLA model, or a dense baseline wrapped the
same way). Caching needs ``model.fingerprint()``; without it every run re-encodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .._assets import cache_dir
from ..io import atomic_path
from ..sparsification import Sparsification  # noqa: F401 - re-exported: lexvla.eval.Sparsification

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


# ----------------------------------------------------------------------------- cache


def file_digest(paths: Sequence[str | Path]) -> str:
    """blake2b over the bytes of every file, in order (a renamed or edited image changes the key)."""
    h = hashlib.blake2b(digest_size=20)
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def text_digest(texts: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=20)
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def model_fingerprint(model: Any) -> str | None:
    fp = getattr(model, "fingerprint", None)
    return str(fp()) if callable(fp) else None


@dataclass
class VectorCache:
    """Encoded vectors on disk as safetensors, one file per (model, modality, exact inputs)."""

    root: Path

    @classmethod
    def default(cls) -> VectorCache:
        return cls(cache_dir("eval", "vectors"))

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    @staticmethod
    def key(model_fp: str, modality: str, data_digest: str, extra: dict | None = None) -> str:
        blob = json.dumps(
            {"v": CACHE_VERSION, "model": model_fp, "modality": modality, "data": data_digest, "extra": extra or {}},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:40]

    def load(self, key: str) -> torch.Tensor | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return load_file(str(p))["vectors"]
        except Exception as err:  # noqa: BLE001 - a corrupt cache file is re-computed, not fatal
            logger.warning("ignoring unreadable cache file %s (%s)", p, err)
            return None

    def save(self, key: str, vectors: torch.Tensor, meta: dict[str, str]) -> None:
        p = self.path(key)
        with atomic_path(p) as tmp:  # a killed run never leaves a half-written cache entry
            save_file({"vectors": vectors.contiguous()}, str(tmp), metadata=meta)


# ----------------------------------------------------------------------------- encoding


def _encode_batches(fn: Callable[[list], Any], items: Sequence, batch_size: int, desc: str, progress: bool) -> torch.Tensor:
    if len(items) == 0:
        raise ValueError(f"nothing to encode ({desc}): the input list is empty")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress, unit="batch"):
            out = fn(list(items[start : start + batch_size]))
            vectors = getattr(out, "vectors", out)
            if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2:
                raise TypeError(f"{desc}: the encoder must return an object with a (N, D) tensor `.vectors`")
            chunks.append(vectors.detach().float().cpu())
    return torch.cat(chunks)


def encode_cached(
    model: Any,
    modality: str,
    items: Sequence,
    *,
    batch_size: int = 32,
    cache: VectorCache | None = None,
    progress: bool = True,
    data_digest: str | None = None,
) -> torch.Tensor:
    """Encode ``items`` (image paths for modality "image", strings for "text") -> (N, D) float32.

    With a cache and a model fingerprint, a second call on the same model and identical inputs loads
    the stored vectors instead of running the model. ``data_digest`` overrides the input hash.
    """
    encoders = {"image": "encode_image", "text": "encode_text"}
    if modality not in encoders:
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    fn = getattr(model, encoders[modality], None)
    if not callable(fn):
        raise TypeError(f"{type(model).__name__} has no {encoders[modality]}() method")
    fp = model_fingerprint(model) if cache is not None else None
    key = None
    if fp is not None:
        digest = data_digest or (file_digest(items) if modality == "image" else text_digest(items))
        key = VectorCache.key(fp, modality, digest, {"n": len(items)})
        hit = cache.load(key)
        if hit is not None and len(hit) == len(items):
            logger.info("loaded %d cached %s vectors from %s", len(hit), modality, cache.path(key))
            return hit
    elif cache is not None:
        logger.info("model has no fingerprint(): encoded vectors are not cached")
    vectors = _encode_batches(fn, items, batch_size, f"encode {modality}s", progress)
    if len(vectors) != len(items):
        raise RuntimeError(f"encoder returned {len(vectors)} vectors for {len(items)} {modality}s")
    if key is not None:
        cache.save(key, vectors, {"model": fp, "modality": modality, "count": str(len(items))})
    return vectors
