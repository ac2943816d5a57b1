"""The training data stream: a pair source (``lexvla.data``), optional caches, batches per process.

Sources are looked up by name in :data:`TRAIN_SOURCES`. Map-style sources (manifest, Hugging Face
dataset, easy-vqa, the feature cache) go through ``lexvla.data.build_dataloader``'s
:class:`~lexvla.data.EpochSampler`: a seeded order per epoch, split across ranks, resumable mid-epoch.
The union of the ranks' micro-batches k is the single-process global micro-batch k (in another row
order, which the contrastive loss does not see). Tar shards stream and split themselves across ranks and
DataLoader workers; a resumed stream is re-read and the consumed batches are dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from .._registry import Registry
from ..data import (
    Batch,
    CachedPairDataset,
    HFDatasetSource,
    ManifestSource,
    SkipStats,
    TarShardSource,
    TextVectorCache,
    build_dataloader,
)
from ..data.cache import cache_backbone_features
from .config import DataSection

logger = logging.getLogger(__name__)


@dataclass
class SourceContext:
    rank: int
    world_size: int
    seed: int
    log_dir: str | None


TRAIN_SOURCES: Registry[Callable[[dict[str, Any], SourceContext], Any]] = Registry("training data source")


register_train_source = TRAIN_SOURCES.register


@register_train_source("manifest")
def _manifest(options: dict[str, Any], ctx: SourceContext) -> ManifestSource:
    """options: manifest, image_root, image_key, caption_key, id_key."""
    return ManifestSource(log_dir=ctx.log_dir, **options)


@register_train_source("shards")
def _shards(options: dict[str, Any], ctx: SourceContext) -> TarShardSource:
    """options: shards (brace pattern or list), shuffle_shards, json_caption_field, name. Repeats forever:
    training length is set by ``steps``."""
    options = {"seed": ctx.seed, **options}
    return TarShardSource(rank=ctx.rank, world_size=ctx.world_size, repeat=True, log_dir=ctx.log_dir, **options)


@register_train_source("hf")
def _hf(options: dict[str, Any], ctx: SourceContext) -> HFDatasetSource:
    """options: dataset (a ``load_from_disk`` folder), image_column, caption_column, id_column, image_root."""
    return HFDatasetSource(log_dir=ctx.log_dir, **options)


@register_train_source("easy-vqa")
def _easy_vqa(options: dict[str, Any], ctx: SourceContext) -> Any:
    """options: split (train), caption_mode (all | first | random), and EasyVQAConfig fields."""
    from ..data import EasyVQAConfig, load_easyvqa

    options = dict(options)
    split = options.pop("split", "train")
    mode = options.pop("caption_mode", "all")
    if "templates" in options:
        options["templates"] = tuple(options["templates"])
    return load_easyvqa(split, EasyVQAConfig(**options), caption_mode=mode)


def _emoji_source(name: str) -> Callable[[dict[str, Any], SourceContext], Any]:
    def factory(options: dict[str, Any], ctx: SourceContext) -> Any:
        """options: split (train), captions, caption_mode, max_keywords, root (EmojiConfig fields)."""
        from ..data.emoji import DATASET_STYLES, EmojiConfig, load_emoji

        options = {"styles": DATASET_STYLES[name], "seed": ctx.seed, **options}
        return load_emoji(config=EmojiConfig(**options))

    return factory


for _name in ("emoji-noto", "emoji-fluent", "emoji-openmoji", "emoji"):
    register_train_source(_name)(_emoji_source(_name))


@register_train_source("clipart")
def _clipart(options: dict[str, Any], ctx: SourceContext) -> ManifestSource:
    """options: split (train | val), root (a prepared folder other than the cache's)."""
    from ..data.clipart import manifest_path

    options = dict(options)
    return ManifestSource(manifest_path(options.pop("root", None)), log_dir=ctx.log_dir,
                          split=options.pop("split", "train"), **options)


@register_train_source("fashion-mnist")
def _fashion(options: dict[str, Any], ctx: SourceContext) -> ManifestSource:
    """options: split (train | test; train needs `lexvla data fetch fashion-mnist --splits train,test`), root."""
    from ..data.fashion import manifest_path

    options = dict(options)
    return ManifestSource(manifest_path(options.pop("split", "train"), options.pop("root", None)),
                          log_dir=ctx.log_dir, **options)


def build_source(cfg: DataSection, ctx: SourceContext) -> Any:
    try:
        factory = TRAIN_SOURCES[cfg.source]
    except KeyError:
        raise ValueError(f"unknown data.source {cfg.source!r}; available: {sorted(TRAIN_SOURCES)}") from None
    try:
        return factory(dict(cfg.options), ctx)
    except TypeError as err:  # a misspelt option reaches the constructor as an unexpected keyword
        raise ValueError(f"data.options for source {cfg.source!r}: {err}") from None


# ------------------------------------------------------------------------------------------- cache keys
def text_fingerprint(model: Any) -> str:
    """Identity of a frozen text side: LLM source, prompt, mapper and vocabulary."""
    cfg = model.config.to_dict()
    h = hashlib.sha256(json.dumps([cfg["text"], cfg["mapper"], cfg["vocab"]], sort_keys=True).encode())
    h.update(model.vocab.fingerprint().encode())
    return h.hexdigest()[:16]


def cache_root(value: str, sub: str) -> Path:
    """Folder of a training cache: ``auto`` = the project cache (``train/<sub>``), else the given path."""
    if value == "auto":
        from .._assets import cache_dir

        return cache_dir("train", sub)
    return Path(value).expanduser()


# ------------------------------------------------------------------------------------------- the stream
class TrainStream:
    """Endless micro-batches for this process, with the position needed to resume exactly.

    ``epoch`` / ``batches_in_epoch`` count this process's micro-batches; :meth:`seek` restores them.
    Text vectors come from the text cache when one is configured (``Batch`` + ``text_vectors``).
    """

    def __init__(self, cfg: DataSection, model: Any, accelerator: Any, seed: int, log_dir: str | None = None,
                 progress: bool = False) -> None:
        self.cfg = cfg
        self.progress = progress  # a bar while the feature cache is computed
        self.acc = accelerator
        self.seed = seed
        world, rank = accelerator.num_processes, accelerator.process_index
        if cfg.batch_size % world:
            raise ValueError(f"data.batch_size {cfg.batch_size} (the global batch) must be divisible by the "
                             f"number of processes {world}")
        self.local_batch = cfg.batch_size // world
        source = build_source(cfg, SourceContext(rank, world, seed, log_dir))
        self.source = source
        self.stats: SkipStats = getattr(source, "stats", None) or SkipStats(source=cfg.source)
        self.iterable = isinstance(source, IterableDataset)
        dataset, preprocess = source, model.preprocess
        if cfg.feature_cache:
            if self.iterable:
                raise ValueError("data.feature_cache needs a map-style source (manifest, hf, easy-vqa); tar "
                                 "shards stream each sample once per epoch")
            dataset = self._feature_dataset(source, model)
            preprocess = None
        self.text_cache: TextVectorCache | None = None
        if cfg.text_cache:
            if model.text.trainable:
                raise ValueError("data.text_cache needs a frozen text side, but the model trains LoRA "
                                 "(set model.overrides.text.lora=null or drop the text cache)")
            if self.iterable:
                raise ValueError("data.text_cache needs a map-style source (its captions are read up front)")
            self.text_cache = self._text_cache(source, model)
        self.dataset = dataset
        self.loader = build_dataloader(dataset, self.local_batch, preprocess=preprocess, shuffle=cfg.shuffle,
                                       seed=seed, num_workers=cfg.num_workers, drop_last=True, rank=rank,
                                       world_size=world)
        if not self.iterable and len(self.loader) == 0:
            raise ValueError(f"the data ({len(dataset)} pairs) is smaller than one batch of "
                             f"{self.local_batch} per process")
        self.epoch = 0
        self.batches_in_epoch = 0
        self.skipped = 0  # unusable samples this process met in batches (all reasons)
        # Samples dropped while the source read its data (and the caches read every image): every rank
        # reads the same data, so one rank counts them. Not saved in checkpoints: a resumed run reads again.
        self.read_skips = self.stats.skipped if accelerator.is_main_process else 0
        self._it: Iterator[Batch] | None = None

    # ------------------------------------------------------------------ caches
    def _feature_dataset(self, source: Any, model: Any) -> CachedPairDataset:
        root = cache_root(self.cfg.feature_cache, "features")

        def build():
            from tqdm.auto import tqdm

            n = len({r.image_id for r in source.pair_records()}) if hasattr(source, "pair_records") else None
            with tqdm(total=n, desc="feature cache", unit="img", dynamic_ncols=True,
                      disable=not (self.progress and self.acc.is_main_process)) as bar:
                return cache_backbone_features(root, source, model.backbone, self.cfg.cache_dtype,
                                               model.image_features, progress=lambda done: bar.update(done - bar.n))

        # The main process computes; the others then find the finished cache.
        with self.acc.main_process_first():
            result = build()
        if result.computed_rows:
            logger.info("feature cache: computed %d images into %s", result.computed_rows, result.store.folder)
        records = source.pair_records() if hasattr(source, "pair_records") else None
        return CachedPairDataset(result.store, records)

    def _text_cache(self, source: Any, model: Any) -> TextVectorCache:
        root = cache_root(self.cfg.text_cache, "text")
        captions = [r.caption for r in source.pair_records()]

        def text_fn(caps: list[str]) -> torch.Tensor:
            with torch.no_grad():
                return model.encode_text(caps).vectors

        with self.acc.main_process_first():
            return TextVectorCache(root, captions, text_fn, text_fingerprint(model), dtype="float32")

    # ------------------------------------------------------------------ position
    @property
    def batches_per_epoch(self) -> int | None:
        """Micro-batches per epoch for this process (None for an endless stream)."""
        return None if self.iterable else len(self.loader)

    def seek(self, epoch: int, batches_in_epoch: int) -> None:
        """Continue from a checkpoint's position."""
        self.epoch, self.batches_in_epoch = epoch, batches_in_epoch
        self._it = None
        if self.iterable:
            self.source.set_epoch(epoch)
            self.loader.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            it = iter(self.loader)
            for _ in range(batches_in_epoch):  # a stream cannot jump: read and drop what was consumed
                next(it)
            self._it = it

    def _start_epoch(self) -> Iterator[Batch]:
        # Every new DataLoader iterator draws its workers' base seed; from a generator of its own (seeded
        # by epoch) it neither shifts the training RNG stream nor depends on when a resumed run starts.
        self.loader.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.iterable:
            self.source.set_epoch(self.epoch)
        else:
            self.loader.sampler.set_epoch(self.epoch)
            self.loader.sampler.set_start(self.batches_in_epoch * self.local_batch)
        return iter(self.loader)

    def next(self) -> tuple[Batch, torch.Tensor | None]:
        """The next non-empty micro-batch of this process and its cached text vectors (or None)."""
        while True:
            if self._it is None:
                self._it = self._start_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.batches_in_epoch = 0
                continue
            self.batches_in_epoch += 1
            self.skipped += len(batch.skipped)
            if batch.skipped and self.cfg.num_workers:
                # Skips made inside DataLoader workers were counted in the workers' copies of the source.
                self.stats.add(batch.skipped)
            if len(batch) == 0:
                logger.warning("a whole batch was skipped (%d unusable samples)", len(batch.skipped))
                continue
            vectors = self.text_cache.vectors(batch.captions) if self.text_cache is not None else None
            return batch, vectors
