"""Training sources that shape what a batch holds: class-balanced easy-vqa batches, and emoji restricted
to images that are in every one of several splits (so one training run leaves out held-out concepts
*and* held-out subgroups, and the demo can evaluate both).

Both register as training sources (``lexvla.train.data.TRAIN_SOURCES``): ``easy-vqa-balanced`` and
``emoji-heldout``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .easyvqa import EasyVQAConfig, EasyVQADataset, load_easyvqa
from .records import PairRecord
from .sources import Pair, SkipStats

BALANCED_SOURCE = "easy-vqa-balanced"
HELDOUT_SOURCE = "emoji-heldout"


class BalancedEasyVQA:
    """easy-vqa pairs ordered so that every aligned block of ``batch_size`` pairs has distinct classes.

    easy-vqa has only 24 colour x shape classes, so a random batch of 24 holds ~9 pairs whose class is
    already in the batch; InfoNCE would push apart what should match. Read in order (``shuffle=False``)
    with the same batch size, every batch here holds ``batch_size`` different classes, each a random image
    of that class (without replacement within the class) and a random caption template.
    """

    def __init__(self, dataset: EasyVQADataset, batch_size: int, batches: int, seed: int = 0) -> None:
        by_class: dict[tuple[str, str], list[int]] = {}
        for i, rec in enumerate(dataset.records):
            by_class.setdefault((rec.colour, rec.shape), []).append(i)
        classes = sorted(by_class)
        if batch_size > len(classes):
            raise ValueError(f"balanced batch_size {batch_size} exceeds the {len(classes)} colour x shape "
                             f"classes present in easy-vqa {dataset.split} (use a batch size <= {len(classes)})")
        if batches < 1:
            raise ValueError(f"batches must be >= 1, got {batches}")
        self.dataset, self.batch_size, self.batches, self.seed = dataset, batch_size, batches, seed
        self.stats = SkipStats(source=f"{BALANCED_SOURCE}-{dataset.split}")
        rng = np.random.default_rng(seed)
        pools: dict[tuple[str, str], list[int]] = {c: [] for c in classes}
        n_templates = len(dataset.config.templates)
        self._index: list[tuple[int, int]] = []  # (record index, template index)
        for _ in range(batches):
            for ci in rng.choice(len(classes), size=batch_size, replace=False):
                pool = pools[classes[int(ci)]]
                if not pool:
                    pool.extend(rng.permutation(by_class[classes[int(ci)]]).tolist())
                self._index.append((pool.pop(), int(rng.integers(n_templates))))

    def __len__(self) -> int:
        return len(self._index)

    def pair_record(self, index: int) -> PairRecord:
        r, t = self._index[index]
        rec = self.dataset.records[r]
        return PairRecord(id=f"{rec.key}#{t}@{index}", image_id=rec.key, caption=rec.captions[t], image=rec.path)

    def pair_records(self) -> list[PairRecord]:
        return [self.pair_record(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> Pair:
        meta = self.pair_record(index)
        rec = self.dataset.records[self._index[index][0]]
        return Pair(image=rec.image(), caption=meta.caption, id=meta.id, image_id=meta.image_id)

    def fingerprint(self) -> str:
        """The images' identity only: the feature cache is keyed per image, not per order."""
        return self.dataset.fingerprint()


_SPLITS: dict[tuple[str, EasyVQAConfig], EasyVQADataset] = {}


def easyvqa_split(split: str, config: EasyVQAConfig) -> EasyVQADataset:
    """``load_easyvqa(split, config, caption_mode="first")`` once per process (label recovery reads every
    image; the demo, the trainer and the evaluation all need the split)."""
    key = (split, config)
    if key not in _SPLITS:
        _SPLITS[key] = load_easyvqa(split, config, caption_mode="first")
    return _SPLITS[key]


def emoji_heldout(styles: tuple[str, ...] = ("noto", "openmoji"), splits: tuple[str, ...] = ("train", "subgroups-train"),
                  **options: Any):
    """Emoji of ``styles`` that are in *every* split of ``splits`` (default: outside the held-out concepts
    and outside the held-out subgroups), as an ``EmojiDataset``; ``options`` are EmojiConfig fields."""
    from .emoji import EmojiConfig, EmojiDataset, emoji_root, read_style

    config = EmojiConfig(styles=tuple(styles), split=splits[0], **options)
    root = emoji_root(config.root)
    images = [im for style in config.styles for im, in_splits in read_style(root, style)
              if all(s in in_splits for s in splits)]
    if not images:
        raise ValueError(f"no emoji of {'+'.join(styles)} is in all of the splits {list(splits)}")
    dataset = EmojiDataset(images, config)
    dataset.stats.source = f"{HELDOUT_SOURCE}-{'+'.join(styles)}-{'&'.join(splits)}"
    return dataset


def register_sources() -> None:
    """Register ``easy-vqa-balanced``, ``emoji-heldout`` and ``emoji-heldout-collages``
    (:mod:`lexvla.data.train_collages`) as training sources (idempotent)."""
    from ..train.data import TRAIN_SOURCES, register_train_source
    from .train_collages import register as register_collages

    register_collages()

    if BALANCED_SOURCE not in TRAIN_SOURCES:
        @register_train_source(BALANCED_SOURCE)
        def _balanced(options: dict[str, Any], ctx: Any) -> BalancedEasyVQA:
            """options: split, batch_size, batches, limit (first N images), and EasyVQAConfig fields."""
            options = dict(options)
            split = options.pop("split", "train")
            batch_size, batches = int(options.pop("batch_size")), int(options.pop("batches"))
            limit = options.pop("limit", None)
            if "templates" in options:
                options["templates"] = tuple(options["templates"])
            ds = easyvqa_split(split, EasyVQAConfig(**options))
            return BalancedEasyVQA(ds.head(int(limit)) if limit else ds, batch_size, batches, seed=ctx.seed)

    if HELDOUT_SOURCE not in TRAIN_SOURCES:
        @register_train_source(HELDOUT_SOURCE)
        def _heldout(options: dict[str, Any], ctx: Any):
            """options: styles, splits (all must hold), and EmojiConfig fields (captions, caption_mode ...)."""
            options = {"seed": ctx.seed, **options}
            for key in ("styles", "splits", "captions"):
                if key in options:
                    options[key] = tuple(options[key])
            return emoji_heldout(**options)
