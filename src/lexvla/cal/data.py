"""Examples for VLM training: (image, prompt question or caption, target) records, precomputed frozen
backbone features, easy-vqa loading and label-noise injection."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# easy-vqa's answers by kind: a wrong answer for label noise is drawn from the same kind, so a noisy
# label is a plausible mistake ("red" for a blue shape), not an off-topic token.
EASYVQA_ANSWER_KINDS: dict[str, tuple[str, ...]] = {
    "yesno": ("yes", "no"),
    "colour": ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow"),
    "shape": ("circle", "rectangle", "triangle"),
}


@dataclass(frozen=True)
class VLMExample:
    """One training/eval record. ``question`` None means a caption example (``target`` is the caption)."""

    image: str
    target: str
    question: str | None = None
    clean_target: str | None = None  # the original answer when label noise replaced it

    @property
    def noisy(self) -> bool:
        return self.clean_target is not None and self.clean_target != self.target


def read_manifest(path: str | Path) -> list[VLMExample]:
    """A manifest in the project's format (``lexvla.data.records``): ``image`` and either ``question`` +
    ``answer`` (VQA) or ``caption`` (one example per caption)."""
    from lexvla.data.records import read_manifest as read_records

    out = [VLMExample(str(r.image), r.caption, r.question) for r in read_records(path)]
    if not out:
        raise ValueError(f"manifest {path} has no records")
    return out


def easy_vqa_examples(split: str, max_images: int | None = None, questions_per_image: int | None = None,
                      seed: int = 0) -> list[VLMExample]:
    """easy-vqa (PyPI ``easy-vqa``) questions as VQA records; a seeded subset of ``max_images`` images with
    at most ``questions_per_image`` questions each."""
    import easy_vqa

    getters = {"train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
               "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths)}
    if split not in getters:
        raise ValueError(f"easy-vqa split must be one of {sorted(getters)}, got {split!r}")
    get_q, get_paths = getters[split]
    questions, answers, image_ids = get_q()
    paths = get_paths()
    by_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(questions, answers, image_ids, strict=True):
        by_image.setdefault(int(i), []).append((q, a))
    rng = random.Random(seed)
    keys = sorted(by_image)
    rng.shuffle(keys)
    if max_images is not None:
        keys = keys[:max_images]
    out = []
    for k in keys:
        qa = by_image[k]
        if questions_per_image is not None and len(qa) > questions_per_image:
            qa = rng.sample(qa, questions_per_image)
        out += [VLMExample(str(paths[k]), a, q) for q, a in qa]
    return out


def answer_kind(answer: str, kinds: dict[str, Sequence[str]] = EASYVQA_ANSWER_KINDS) -> str:
    for kind, values in kinds.items():
        if answer in values:
            return kind
    raise ValueError(f"answer {answer!r} belongs to none of the answer kinds {sorted(kinds)}")


def noisy_positions(n: int, rate: float, seed: int) -> tuple[set[int], list[float]]:
    """The ``round(rate * n)`` positions to corrupt and one uniform draw per position (to pick the
    replacement). Seeded, and nested across rates: the positions chosen at a rate are among those chosen
    at any higher rate, and a position's draw does not depend on the rate."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    draws = [rng.random() for _ in range(n)]
    return set(order[: round(rate * n)]), draws


def inject_label_noise(examples: Sequence[VLMExample], rate: float, seed: int = 0,
                       kinds: dict[str, Sequence[str]] = EASYVQA_ANSWER_KINDS) -> list[VLMExample]:
    """Replace the answer of a seeded ``rate`` fraction of the examples with a wrong answer of the same
    kind; ``clean_target`` keeps the original. The chosen set is nested across rates for one seed (the
    20% noisy examples are among the 40%), so runs at different rates differ only by the extra noise."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}")
    chosen, wrong = noisy_positions(len(examples), rate, seed)
    out = []
    for i, ex in enumerate(examples):
        if i not in chosen:
            out.append(ex)
            continue
        options = [a for a in kinds[answer_kind(ex.target, kinds)] if a != ex.target]
        out.append(VLMExample(ex.image, options[int(wrong[i] * len(options))], ex.question, ex.target))
    return out


def format_target(text: str) -> str:
    """Targets follow the prompt after a space (the tokeniser's word-initial tokens)."""
    return " " + text.strip()


@torch.no_grad()
def compute_features(backbone: torch.nn.Module, images: Sequence[str], batch_size: int = 64,
                     cache: str | Path | None = None, blur_sigma: float | None = None) -> dict[str, torch.Tensor]:
    """Frozen backbone tokens (P, C) per unique image path, computed once; with ``cache`` (a folder)
    stored as safetensors keyed by the backbone config and the image list. ``blur_sigma`` blurs the
    preprocessed pixels first (features for CAL's "blur" condition)."""
    from safetensors.torch import load_file, save_file

    from lexvla.cal.conditions import gaussian_blur
    from lexvla.data.cache import backbone_fingerprint

    unique = sorted(set(images))
    file = None
    if cache is not None:
        # the one backbone identity of every feature cache (lexvla.data.cache), not the config's repr
        key = json.dumps({"backbone": backbone_fingerprint(backbone), "preprocessing": repr(backbone.preprocess),
                          "images": unique, "blur": blur_sigma}, sort_keys=True)
        file = Path(cache) / f"features-{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"
        if file.is_file():
            stacked = load_file(file)["features"]
            return dict(zip(unique, stacked, strict=True))
    chunks = []
    for i in range(0, len(unique), batch_size):
        pixels = backbone.preprocess(unique[i:i + batch_size])
        if blur_sigma is not None:
            pixels = gaussian_blur(pixels, blur_sigma)
        chunks.append(backbone(pixels).half())
    stacked = torch.cat(chunks)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": stacked.contiguous()}, file)
    logger.info("computed backbone features for %d images: %s", len(unique), tuple(stacked.shape))
    return dict(zip(unique, stacked, strict=True))


def dataset_concepts(name: str, split: str = "train"):
    """Concepts (:class:`lexvla.cal.captions.Concept`: base name, CLDR keywords, the RGBA cut-outs of every
    image of the concept, skin tones included) of an emoji data set (``emoji-noto``, ``emoji-fluent``,
    ``emoji-openmoji``, ``emoji``) prepared by ``lexvla data fetch emoji``."""
    from lexvla.cal.captions import Concept
    from lexvla.data.emoji import DATASET_STYLES, concept_name, load_emoji

    if name not in DATASET_STYLES:
        raise ValueError(f"unknown concept data set {name!r}: a concepts JSONL file, 'fixture' or one of "
                         f"{sorted(DATASET_STYLES)}")
    ds = load_emoji(DATASET_STYLES[name], split)
    by_concept: dict[str, list] = {}
    for im in ds.images:
        by_concept.setdefault(im.concept, []).append(im)
    return [Concept(concept_name(ims, c), ims[0].keywords, tuple(str(im.rgba) for im in ims))
            for c, ims in sorted(by_concept.items())]
