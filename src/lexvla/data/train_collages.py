"""Multi-object training pairs: collages of TRAIN-split emoji whose caption names one or all objects.

A model trained only on single centred emoji never sees a patch whose neighbours show something else,
so at test time every patch of a collage carries a blend of all its objects. Collages drawn from the
training concepts (the concepts of the held-out collages never appear: the images come from the same
``emoji-heldout`` selection the emoji pairs do) with a caption naming one object ("an emoji of X", the
emoji pairs' own template, so its LLM pass is usually shared with them) or all of them ("emojis of X, Y
and Z") make max-pooling over patches pay for patches that carry their own object.

Registered as the training source ``emoji-heldout-collages``: the emoji pairs of ``emoji-heldout``
followed by ``collages`` generated pairs (the trainer shuffles them together). Everything is
deterministic from ``seed``: collage ``i`` depends only on (seed, i).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from .collages import CollageConfig, CollageSet
from .records import PairRecord
from .sources import Pair, SkipStats

SOURCE = "emoji-heldout-collages"
CAPTION_MODES = ("one", "all", "mixed")
ONE_TEMPLATE = "an emoji of {}"  # = the emoji pairs' "emoji" caption template


@dataclass(frozen=True)
class TrainCollageConfig:
    """How many training collages, how they look, and what their captions name."""

    count: int = 2000
    size: int = 128  # drawn at this size; the trainer resizes to the model's input
    objects: tuple[int, int] = (2, 3)
    scale: tuple[float, float] = (0.35, 0.6)
    captions: str = "mixed"  # one object, all objects, or each collage one of the two at random
    backgrounds: tuple[str, ...] = ("plain", "gradient")
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("objects", "scale", "backgrounds"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.captions not in CAPTION_MODES:
            raise ValueError(f"collage captions must be one of {CAPTION_MODES}, got {self.captions!r}")
        if self.count < 1:
            raise ValueError(f"collage count must be >= 1, got {self.count}")


def name_all(names: list[str]) -> str:
    """'emojis of X, Y and Z' (one name: the one-object caption)."""
    if len(names) == 1:
        return ONE_TEMPLATE.format(names[0])
    return "emojis of " + ", ".join(names[:-1]) + " and " + names[-1]


class TrainCollages:
    """Map-style pair source of collages over ``images`` (emoji of the training concepts only)."""

    def __init__(self, images: list[Any], config: TrainCollageConfig | None = None) -> None:
        self.config = config or TrainCollageConfig()
        c = self.config
        # CollageSet keeps its own (seed, i) stream for layout; the caption draws from (seed, i, 1).
        self.collages = CollageSet(CollageConfig(split="train", count=c.count, size=c.size, objects=c.objects,
                                                 scale=c.scale, backgrounds=c.backgrounds, seed=c.seed),
                                   images=images)
        self.stats = SkipStats(source=f"{SOURCE}-collages")
        self._names: dict[int, list[str]] = {}  # the records are asked for often; drawing costs ~ms

    def __len__(self) -> int:
        return self.config.count

    def names(self, index: int) -> list[str]:
        """The names of collage ``index``'s objects, in paste order."""
        if index not in self._names:
            self._names[index] = [self.collages.class_names[p.label] for p in self.collages.draw(index, mask=False).placements]
        return self._names[index]

    def caption(self, index: int, names: list[str]) -> str:
        rng = np.random.default_rng([self.config.seed, index, 1])
        mode = self.config.captions
        if mode == "mixed":
            mode = "one" if rng.random() < 0.5 else "all"
        if mode == "one":
            return ONE_TEMPLATE.format(names[int(rng.integers(len(names)))])
        return name_all(names)

    def pair_record(self, index: int) -> PairRecord:
        names = self.names(index)
        cid = f"train-collage-{self.config.seed}-{index:05d}"
        return PairRecord(id=cid, image_id=cid, caption=self.caption(index, names), key=cid)

    def pair_records(self) -> list[PairRecord]:
        return [self.pair_record(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> Pair:
        rec = self.pair_record(index)
        self.stats.yielded += 1
        return Pair(image=Image.fromarray(self.collages.draw(index, mask=False).image), caption=rec.caption, id=rec.id,
                    image_id=rec.image_id)

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        for concept in self.collages.concepts:
            for im in self.collages.by_concept[concept]:
                h.update(f"{im.id}\n".encode())
        return h.hexdigest()[:16]


class ConcatPairs:
    """Two map-style pair sources one after the other (the emoji pairs, then the collages)."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second
        self.stats = first.stats

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def _part(self, index: int) -> tuple[Any, int]:
        n = len(self.first)
        return (self.first, index) if index < n else (self.second, index - n)

    def pair_record(self, index: int) -> PairRecord:
        part, i = self._part(index)
        return part.pair_record(i)

    def pair_records(self) -> list[PairRecord]:
        return [self.pair_record(i) for i in range(len(self))]

    def __getitem__(self, index: int):
        part, i = self._part(index)
        return part[i]

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.first.fingerprint()}+{self.second.fingerprint()}".encode()).hexdigest()[:16]


def emoji_with_collages(collages: dict[str, Any] | None = None, **emoji_options: Any) -> ConcatPairs:
    """``emoji-heldout`` pairs (``emoji_options``: styles, splits, EmojiConfig fields) followed by training
    collages of the same images (``collages``: TrainCollageConfig fields)."""
    from .sampling import emoji_heldout

    emoji = emoji_heldout(**emoji_options)
    return ConcatPairs(emoji, TrainCollages(emoji.images, TrainCollageConfig(**(collages or {}))))


def register() -> None:
    """Register ``emoji-heldout-collages`` as a training source (idempotent)."""
    from ..train.data import TRAIN_SOURCES, register_train_source

    if SOURCE in TRAIN_SOURCES:
        return

    @register_train_source(SOURCE)
    def _source(options: dict[str, Any], ctx: Any) -> ConcatPairs:
        """options: emoji-heldout's (styles, splits, EmojiConfig fields) and ``collages`` (TrainCollageConfig fields)."""
        options = {"seed": ctx.seed, **options}
        for key in ("styles", "splits", "captions"):
            if key in options:
                options[key] = tuple(options[key])
        collages = dict(options.pop("collages", None) or {})
        collages.setdefault("seed", options["seed"])
        return emoji_with_collages(collages, **options)
