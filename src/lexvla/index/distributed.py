"""Scale-out index builds: ranks encode disjoint shards into their own stores, merged at the end.

``lexvla index build --shards ... --out idx/`` launched by ``torchrun`` or ``accelerate launch`` (any
launcher that sets ``RANK`` and ``WORLD_SIZE``) takes this path: rank r encodes shards r, r + W, r + 2W,
... of the expanded shard list into its own index ``idx/parts/rank-<r>/`` (its own writer lock, so
ranks never wait for each other, and each part resumes on its own after a crash), marks it done, and
rank 0 merges every part into ``idx/`` once all are done (:func:`merge_indexes`; also ``lexvla index
merge``). The merged index then syncs its backend once: with ``--backend milvus --uri
http://host:19530`` that is one Milvus collection on the server holding every rank's rows; the local
store stays the source of truth for explanations. No process group is needed (the parts are
coordinated through files), so ranks may run on machines that share the output folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lexvla.index.core import COLLECTIONS, SparseIndex, writer_lock
from lexvla.io import atomic_write_text

logger = logging.getLogger(__name__)

PARTS = "parts"
DONE = "part-done.json"


def launch_rank_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (``RANK``/``WORLD_SIZE``); (0, 1) without one."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                         "are not integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def rank_shards(shards: str | Sequence[str], rank: int, world: int) -> list[str]:
    """The shards rank ``rank`` of ``world`` encodes: every ``world``-th of the expanded list."""
    from lexvla.data.sources import expand_shards

    every = expand_shards(shards)
    if len(every) < world:
        raise ValueError(f"{len(every)} shard(s) for {world} ranks: give at least one shard per rank")
    return every[rank::world]


def part_dir(out: str | Path, rank: int) -> Path:
    return Path(out) / PARTS / f"rank-{rank:03d}"


@dataclass
class MergeReport:
    out: str
    parts: list[str]
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def merge_indexes(parts: Sequence[str | Path], out: str | Path, backend: str | None = None,
                  backend_options: dict | None = None, chunk: int = 50_000, sync: bool = True) -> MergeReport:
    """Append the live rows of every part (same model, vocabulary and sparsification) into a new index.

    Ids must be unique across parts (disjoint shards give that); a duplicate is refused naming it.
    ``backend``: the merged index's backend (default: the first part's), synced at the end unless
    ``sync=False``.
    """
    t0 = time.perf_counter()
    parts = [Path(p) for p in parts]
    if not parts:
        raise ValueError("nothing to merge: give at least one index part")
    opened = [SparseIndex.open(p) for p in parts]
    try:
        first = opened[0]
        for p, ix in zip(parts[1:], opened[1:]):
            if ix.model_record != first.model_record:
                raise ValueError(f"{p} was built with model {ix.model_record.fingerprint}, {parts[0]} with "
                                 f"{first.model_record.fingerprint}: parts of one index need one model")
            if ix.sparsify_settings != first.sparsify_settings:
                raise ValueError(f"{p} sparsifies with {ix.sparsify_settings}, {parts[0]} with "
                                 f"{first.sparsify_settings}")
        name = backend or first.backend_name
        options = dict(first.backend_options if name == first.backend_name else {})
        options.update(backend_options or {})
        Path(out).mkdir(parents=True, exist_ok=True)
        lock = writer_lock(out)
        lock.__enter__()
        merged = SparseIndex.create(out, first.vocab, first.model_record, first.sparsify_settings, name, options,
                                    model_source=first.model_source)
        report = MergeReport(str(out), [str(p) for p in parts])
        with merged:
            for c in COLLECTIONS:
                total = 0
                for ix in opened:
                    if not (ix.path / c / "manifest.json").is_file():
                        continue
                    src = ix.store(c)
                    m, items, alive = src.matrix(), src.items(), src.alive_mask()
                    for s in range(0, src.n_rows, chunk):
                        rows = np.flatnonzero(alive[s:s + chunk]) + s
                        if len(rows):
                            merged.store(c).append(m[rows], [items[r] for r in rows])
                            total += len(rows)
                if total:
                    report.rows[c] = total
            if sync:
                merged.sync()
        lock.__exit__(None, None, None)
        report.seconds = time.perf_counter() - t0
        logger.info("merged %d part(s) into %s: %s rows in %.1fs", len(parts), out, report.rows, report.seconds)
        return report
    finally:
        for ix in opened:
            ix.close()


def build_rank_part(build, out: str | Path, shards: str | Sequence[str], rank: int, world: int,
                    **build_kwargs) -> Path:
    """Rank ``rank``'s share: ``build(out=part, shards=its shards, **build_kwargs)``, then its done marker."""
    part = part_dir(out, rank)
    mine = rank_shards(shards, rank, world)
    logger.info("rank %d/%d: %d shard(s) -> %s", rank, world, len(mine), part)
    report = build(out=part, shards=mine, **build_kwargs)
    atomic_write_text(part / DONE, json.dumps({"rank": rank, "world": world, "shards": mine}))
    return report


def wait_and_merge(out: str | Path, world: int, timeout_s: float = 7 * 24 * 3600.0, poll_s: float = 2.0,
                   **merge_kwargs) -> MergeReport:
    """Rank 0: wait until every rank's part is done, then merge them into ``out``."""
    parts = [part_dir(out, r) for r in range(world)]
    deadline = time.monotonic() + timeout_s
    while not all((p / DONE).is_file() for p in parts):
        if time.monotonic() > deadline:
            missing = [str(p) for p in parts if not (p / DONE).is_file()]
            raise TimeoutError(f"index parts not finished after {timeout_s:.0f}s: {missing}")
        time.sleep(poll_s)
    return merge_indexes(parts, out, **merge_kwargs)
