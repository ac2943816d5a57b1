"""``lexvla demo``: train LexVLA on the easy-vqa toy set on the CPU, evaluate it, and write a report.

The demo runs the project's real pieces end to end:

1. the easy-vqa image-text set with recovered colour + shape labels (:mod:`lexvla.data.easyvqa`);
2. backbone features and text vectors cached on disk (:mod:`lexvla.data.cache`), so a second run skips the
   frozen encoders;
3. the Accelerate trainer (:mod:`lexvla.train`) on *class-balanced* batches (below);
4. zero-shot retrieval on the test split with the vectors sparsified at the paper's 1/sqrt(V) threshold
   (:mod:`lexvla.eval`): an image and a caption match when they name the same colour and shape;
5. an HTML page with PNGs (:mod:`lexvla.viz`): training curves, R@1/5/10, active words, word clouds of test
   images, the words captions activate, and the patches a word lights up.

Why class-balanced batches: easy-vqa has only 24 colour x shape classes, so a random batch of 24 pairs holds
on average ~9 pairs whose class already occurs in the batch. InfoNCE treats those as negatives although their
captions name the same thing, and pushes apart what should match. Each demo batch instead holds one image of
every class (a random image and a random caption template), so every in-batch negative is a true negative.
The trained checkpoint is cached under the project cache, keyed by the model, the training settings and the
data; ``--retrain`` ignores it.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import EasyVQAConfig, EasyVQADataset, Pair, PairRecord, SkipStats, load_easyvqa
from .sparsification import Sparsification

logger = logging.getLogger(__name__)

BALANCED_SOURCE = "easy-vqa-balanced"
TIME_LIMIT_MINUTES = 15


def say(message: str) -> None:
    """Demo narration on stdout (the library itself logs; the command talks to the user)."""
    print(message, flush=True)


# ------------------------------------------------------------------------------------ balanced batches
class BalancedEasyVQA:
    """easy-vqa pairs ordered so that every aligned block of ``batch_size`` pairs has distinct classes.

    Read in order (``shuffle=False``) with the same batch size, every batch holds ``batch_size`` different
    colour x shape classes, each with a random image of that class and a random caption template; images
    of a class are drawn without replacement (a fresh shuffle each time the class's list runs out), so all
    images are used. The order is fixed by ``seed``; ``batches`` blocks are laid out (one epoch).
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


def _register_balanced_source() -> None:
    from .train.data import TRAIN_SOURCES, register_train_source

    if BALANCED_SOURCE in TRAIN_SOURCES:
        return

    @register_train_source(BALANCED_SOURCE)
    def _balanced(options: dict[str, Any], ctx: Any) -> BalancedEasyVQA:
        """options: split, batch_size, batches, limit (first N images), and EasyVQAConfig fields."""
        options = dict(options)
        split = options.pop("split", "train")
        batch_size = int(options.pop("batch_size"))
        batches = int(options.pop("batches"))
        limit = options.pop("limit", None)
        if "templates" in options:
            options["templates"] = tuple(options["templates"])
        ds = _load_split(split, EasyVQAConfig(**options))
        if limit:
            ds = ds.head(int(limit))
        return BalancedEasyVQA(ds, batch_size, batches, seed=ctx.seed)


_SPLITS: dict[tuple[str, EasyVQAConfig], EasyVQADataset] = {}


def _load_split(split: str, config: EasyVQAConfig) -> EasyVQADataset:
    """``load_easyvqa(split, config, caption_mode="first")``, once per process: label recovery reads and
    checks every image of the split, and the demo, its cache pre-build and the trainer all need the split."""
    key = (split, config)
    if key not in _SPLITS:
        _SPLITS[key] = load_easyvqa(split, config, caption_mode="first")
    return _SPLITS[key]


# ------------------------------------------------------------------------------------------- config
@dataclass
class DemoConfig:
    """What ``lexvla demo`` runs. The defaults are the measured demo (docs/training.md)."""

    model: str = "lexvla-embedded"
    steps: int = 60
    batch_size: int = 24  # one image of each colour x shape class per batch
    lr_adapter: float = 1e-3
    lr_codebook: float = 1e-3
    lr_temperature: float = 1e-3
    warmup_steps: int = 20
    regulariser_weight: float = 1e-3
    # First N train images. 1,200 (about 50 per class) reach the target in 50-100 steps (docs/training.md)
    # at a third of the backbone cost of all 3,220; None = all.
    train_images: int | None = 1200
    test_images: int | None = None  # first N test images; None = all
    check_pixels: bool = True  # easy-vqa: cross-check the recovered colour against the pixels
    output_dir: str = "reports/demo"
    cache_dir: str | None = None  # root of the demo's caches (None = the project cache, $LEXVLA_CACHE)
    retrain: bool = False
    seed: int = 0
    examples: int = 4  # test images shown with word clouds and heat maps
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (a contrastive batch), got {self.batch_size}")
        for name in ("train_images", "test_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if self.examples < 1:
            raise ValueError(f"examples must be >= 1, got {self.examples}")

    def train_key(self, data_fingerprint: str) -> str:
        """Identity of the trained checkpoint: everything that changes the trained weights."""
        fields = {k: v for k, v in asdict(self).items()
                  if k not in ("output_dir", "cache_dir", "retrain", "examples", "progress", "test_images")}
        payload = json.dumps({"demo": fields, "data": data_fingerprint, "version": 1}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class DemoResult:
    """What the demo measured and where it wrote things."""

    report: str
    model_dir: str
    i2t: dict[str, float]
    t2i: dict[str, float]
    active_words: dict[str, float]
    num_test_images: int
    num_test_texts: int
    trained_now: bool
    train_seconds: float
    pairs_per_second: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------- stages
class _Clock:
    """Wall time per stage, for the report and the closing summary."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}
        self._t = self.start

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + now - self._t
        self._t = now
        return self.stages[name]

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def _cache_roots(cfg: DemoConfig) -> dict[str, Path]:
    """Where the trained runs, backbone features and text vectors are kept (the features and text
    vectors share the trainer's ``auto`` caches when ``cache_dir`` is not set)."""
    from ._assets import cache_dir

    base = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_dir()
    return {"runs": base / "demo", "features": base / "train" / "features", "text": base / "train" / "text"}


def _model_is_text_frozen(name: str) -> bool:
    return _model_config(name).text.lora is None


def _train_config(cfg: DemoConfig, run_dir: Path, text_frozen: bool):
    from .train import TrainConfig

    roots = _cache_roots(cfg)
    data_options: dict[str, Any] = {"split": "train", "batch_size": cfg.batch_size, "batches": cfg.steps,
                                    "check_pixels": cfg.check_pixels}
    if cfg.train_images:
        data_options["limit"] = cfg.train_images
    return TrainConfig.from_dict({
        "model": {"name": cfg.model},
        "data": {"source": BALANCED_SOURCE, "options": data_options, "batch_size": cfg.batch_size,
                 "shuffle": False, "feature_cache": str(roots["features"]),
                 "text_cache": str(roots["text"]) if text_frozen else None},
        "optim": {"lr": {"adapter": cfg.lr_adapter, "visual_codebook": cfg.lr_codebook, "lora": cfg.lr_adapter,
                         "temperature": cfg.lr_temperature},
                  "weight_decay": {"adapter": 0.0},
                  "warmup_steps": min(cfg.warmup_steps, cfg.steps - 1)},
        "loss": {"regulariser": "overuse", "image_weight": cfg.regulariser_weight,
                 "text_weight": cfg.regulariser_weight, "ramp_steps": cfg.steps // 3},
        "steps": cfg.steps,
        "log_every": max(1, min(10, cfg.steps // 20)),
        "checkpoint_every": 0,
        "keep_checkpoints": 1,
        "output_dir": str(run_dir),
        "seed": cfg.seed,
        "tensorboard": False,
        "progress": cfg.progress,
        "cpu": True,
    })


def _model_config(name: str):
    """The LexVLAConfig of a zoo name or a checkpoint folder, without loading any weights."""
    from .config import LexVLAConfig
    from .models.lexvla import CONFIG_FILE
    from .models.zoo import get_config

    path = Path(name)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return LexVLAConfig.load(path / CONFIG_FILE)
    return get_config(name)


def _build_like_trainer(tcfg) -> Any:
    """The model exactly as :func:`lexvla.train.train` builds it (same seed, same random draws), so the
    caches filled here carry the keys the trainer looks for, random test backbones included."""
    from accelerate.utils import set_seed

    from .train.trainer import build_model

    set_seed(tcfg.seed)
    return build_model(tcfg)


def _text_fn(model: Any, bar: Any, chunk: int = 16):
    """Frozen text side -> lexical vectors, advancing a progress bar every ``chunk`` captions."""

    def encode(captions: list[str]) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(captions), chunk):
                out.append(model.encode_text(captions[i:i + chunk]).vectors)
                bar.update(len(captions[i:i + chunk]))
        return torch.cat(out)

    return encode


def _prebuild_caches(tcfg, model: Any, progress: bool) -> None:
    """Fill the trainer's feature and text caches with progress bars; the trainer then finds them finished
    (it has no bars of its own for them)."""
    from tqdm.auto import tqdm

    from .data import TextVectorCache
    from .data.cache import cache_backbone_features
    from .train.data import SourceContext, build_source, cache_root, text_fingerprint

    source = build_source(tcfg.data, SourceContext(0, 1, tcfg.seed, None))
    records = source.pair_records()
    n_images = len({r.image_id for r in records})
    with tqdm(total=n_images, desc="backbone features (train)", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        cache_backbone_features(cache_root(tcfg.data.feature_cache, "features"), source, model.backbone,
                                tcfg.data.cache_dtype, model.image_features, progress=lambda n: bar.update(n - bar.n))
    if tcfg.data.text_cache:
        captions = sorted({r.caption for r in records})
        with tqdm(total=len(captions), desc="caption vectors", unit="caption", disable=not progress,
                  dynamic_ncols=True) as bar:
            TextVectorCache(cache_root(tcfg.data.text_cache, "text"), captions, _text_fn(model, bar),
                            text_fingerprint(model), dtype="float32")


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    from .train.tracking import METRICS_FILE

    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class _Evaluation:
    result: Any  # lexvla.eval.retrieval.RetrievalResult
    data: Any  # RetrievalSet
    image_vectors: torch.Tensor  # dense (N, V)
    text_vectors: torch.Tensor  # dense (T, V)
    features: torch.Tensor  # backbone features of the test images (N, P, C)


def _evaluate(model: Any, cfg: DemoConfig, progress: bool) -> _Evaluation:
    """Zero-shot retrieval on the easy-vqa test split, from cached backbone features and text vectors."""
    from tqdm.auto import tqdm

    from .data import TextVectorCache
    from .data.cache import cache_backbone_features
    from .eval.retrieval import retrieval_from_vectors
    from .eval.retrieval_data import RetrievalDataConfig, load_retrieval_set
    from .train.data import text_fingerprint

    roots = _cache_roots(cfg)
    data = load_retrieval_set("easy-vqa", RetrievalDataConfig(split="test", captions_per_image=None,
                                                               limit=cfg.test_images))
    test = _load_split("test", EasyVQAConfig(check_pixels=cfg.check_pixels))
    wanted = {str(p) for p in data.image_paths}
    test = EasyVQADataset([r for r in test.records if str(Path(r.path)) in wanted], test.stats, test.config,
                          test.split, test.caption_mode)
    with tqdm(total=len(test), desc="backbone features (test)", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        built = cache_backbone_features(roots["features"], test, model.backbone, features_fn=model.image_features,
                                        progress=lambda n: bar.update(n - bar.n))
    key_of = {str(Path(r.path)): r.key for r in test.records}
    missing = [p for p in data.image_paths if str(p) not in key_of]
    if missing:
        raise ValueError(f"{len(missing)} easy-vqa test images of the retrieval set are not in the demo's "
                         f"test split (first: {missing[0]})")
    features = built.store.stack([key_of[str(p)] for p in data.image_paths])
    model.eval()
    with torch.no_grad():
        images = torch.cat([model.encode_image_features(features[i:i + 128]).vectors
                            for i in range(0, len(features), 128)])
        if model.text.trainable:
            texts = model.encode_text(data.texts).vectors
        else:
            cache = TextVectorCache(roots["text"], data.texts,
                                    lambda caps: model.encode_text(caps).vectors, text_fingerprint(model))
            texts = cache.vectors(data.texts)
    result = retrieval_from_vectors(images, texts, data, Sparsification(), model_name=cfg.model)
    return _Evaluation(result, data, images, texts, features)


# ------------------------------------------------------------------------------------------- report
def _curves_figure(metrics: list[dict[str, Any]], path: Path) -> bool:
    from .viz._common import new_figure, save_figure

    if not metrics:
        return False
    steps = [m["step"] for m in metrics]
    panels = [("loss", "training loss"), ("words/image", "active words (> 1/sqrt(V))"),
              ("temperature", "temperature")]
    fig = new_figure(12, 3.4)
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if key == "words/image":
            ax.plot(steps, [m.get("words/image", math.nan) for m in metrics], label="image")
            ax.plot(steps, [m.get("words/text", math.nan) for m in metrics], label="caption")
            ax.legend()
        else:
            ax.plot(steps, [m.get(key, math.nan) for m in metrics])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def _example_indices(data: Any, count: int) -> list[int]:
    """The first test image of ``count`` classes spread over colours and shapes.

    Classes are taken with a stride of 7 through the sorted class ids (7 is prime to easy-vqa's 24 = 8
    colours x 3 shapes, so consecutive picks change both colour and shape).
    """
    keys = np.asarray(data.image_keys)
    classes = sorted(set(keys.tolist()))
    order = list(dict.fromkeys([classes[(j * 7) % len(classes)] for j in range(len(classes))] + classes))
    return [int(np.flatnonzero(keys == cls)[0]) for cls in order[:count]]


def _clouds_figure(model: Any, images: list[Any], vectors: torch.Tensor, titles: list[str], path: Path) -> None:
    from .viz import WordCloudConfig, draw_word_cloud
    from .viz._common import new_figure, save_figure

    n = len(images)
    fig = new_figure(10, 2.6 * n)
    words = model.top_words(vectors, 40)
    for row in range(n):
        ax = fig.add_axes((0.01, 1 - (row + 1) / n + 0.02 / n, 0.22, 0.9 / n))
        ax.imshow(images[row])
        ax.set_axis_off()
        ax.set_title(titles[row], fontsize=10)
        ax2 = fig.add_axes((0.26, 1 - (row + 1) / n + 0.02 / n, 0.73, 0.9 / n))
        draw_word_cloud(ax2, words[row], WordCloudConfig(width=700, height=220, max_words=40))
        ax2.set_axis_off()
    save_figure(fig, path)


def _caption_words_figure(model: Any, captions: list[str], vectors: torch.Tensor, path: Path, k: int = 8) -> None:
    from .viz._common import new_figure, save_figure

    words = model.top_words(vectors, k)
    n = len(captions)
    fig = new_figure(10, 2.2 * math.ceil(n / 2))
    for i, (cap, ws) in enumerate(zip(captions, words)):
        ax = fig.add_subplot(math.ceil(n / 2), 2, i + 1)
        names = [w for w, _ in ws][::-1]
        ax.barh(names, [v for _, v in ws][::-1], color="#4a7ebb")
        ax.set_title(f"“{cap}”", fontsize=10)
        ax.tick_params(labelsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def _word_patches_figure(model: Any, images: list[Any], patch_vectors: torch.Tensor, grid: tuple[int, int],
                         words_per_image: list[list[str]], path: Path) -> None:
    from .viz import draw_text_heatmap
    from .viz._common import new_figure, save_figure

    n = len(images)
    cols = 1 + max(len(w) for w in words_per_image)
    fig = new_figure(3 * cols, 3.1 * n)
    for row in range(n):
        ax = fig.add_subplot(n, cols, row * cols + 1)
        ax.imshow(images[row])
        ax.set_axis_off()
        ax.set_title("image", fontsize=10)
        for j, word in enumerate(words_per_image[row]):
            ax = fig.add_subplot(n, cols, row * cols + 2 + j)
            scores = patch_vectors[row, :, model.vocab.index(word)].float().reshape(grid).numpy()
            draw_text_heatmap(ax, images[row], scores, title=f"“{word}”")
    fig.tight_layout()
    save_figure(fig, path)


def _write_report(out_dir: Path, model: Any, cfg: DemoConfig, ev: _Evaluation, metrics: list[dict[str, Any]],
                  summary: dict[str, Any]) -> Path:
    from .viz import HtmlSection, patch_top_words, patch_words_figure, write_html_page
    from .viz.html import paragraph, words_table

    out_dir.mkdir(parents=True, exist_ok=True)
    res, data = ev.result, ev.data
    sections: list[HtmlSection] = []

    rows = [[f"R@{k}", res.image_to_text.recall[k], res.text_to_image.recall[k]] for k in sorted(res.image_to_text.recall)]
    rows.append(["mean rank", res.image_to_text.mean_rank, res.text_to_image.mean_rank])
    body = words_table(rows, ["", "image → text", "text → image"])
    body += words_table([["per image", res.active_words["image"]], ["per caption", res.active_words["text"]],
                         ["vocabulary", len(model.vocab)]], ["mean active words", ""])
    body += paragraph(f"{res.num_images} test images, {res.num_texts} distinct captions; a match = same colour "
                      f"and shape; vectors sparsified at 1/sqrt(V) = {Sparsification().threshold_for(len(model.vocab)):.5f}; "
                      f"ties counted against the model.", "note")
    sections.append(HtmlSection("Zero-shot retrieval on the easy-vqa test split", body=body))

    if _curves_figure(metrics, out_dir / "curves.png"):
        sections.append(HtmlSection("Training curves", "curves.png",
                                    paragraph("Loss (InfoNCE + overuse penalty), mean active words of the batch's "
                                              "image and caption vectors, and the learnt temperature.", "note")))

    idx = _example_indices(data, cfg.examples)
    from .data import decode_image

    pictures = [decode_image(data.image_paths[i]) for i in idx]
    sparse_img = model.sparsify(_lexical(ev.image_vectors[idx]))
    captions_of = {int(k): c for c, k in zip(data.texts, data.text_keys)}
    titles = [captions_of[int(data.image_keys[i])].replace("a ", "", 1) for i in idx]
    _clouds_figure(model, pictures, sparse_img.vectors, titles, out_dir / "image_words.png")
    table = [[t, ", ".join(w for w, _ in ws[:8])] for t, ws in zip(titles, model.top_words(sparse_img, 8))]
    sections.append(HtmlSection("Words of test images", "image_words.png",
                                words_table(table, ["image (true class)", "top words"])))

    cap_idx = [int(np.flatnonzero(np.asarray(data.text_keys) == data.image_keys[i])[0]) for i in idx]
    cap_idx += [int(np.flatnonzero(np.asarray(data.text_keys) == data.image_keys[idx[0]])[-1])]
    caps = [data.texts[i] for i in cap_idx]
    sparse_txt = model.sparsify(_lexical(ev.text_vectors[cap_idx]))
    _caption_words_figure(model, caps, sparse_txt.vectors, out_dir / "caption_words.png")
    table = [[c, int((v > 0).sum()), ", ".join(w for w, _ in ws)]
             for c, v, ws in zip(caps, sparse_txt.vectors, model.top_words(sparse_txt, 8))]
    sections.append(HtmlSection("Words that captions activate", "caption_words.png",
                                words_table(table, ["caption", "active words", "top words"])))

    with torch.no_grad():
        patches = model.encode_image_features(ev.features[idx], return_patches=True)
    from .data.easyvqa import COLOURS, SHAPES

    words = []
    for t in titles:
        named = [w for w in t.split() if w in COLOURS or w in SHAPES]
        words.append([w for w in named if w in model.vocab] or [model.top_words(sparse_img, 1)[len(words)][0][0]])
    _word_patches_figure(model, pictures, patches.patch_vectors, patches.grid, words, out_dir / "word_patches.png")
    sections.append(HtmlSection("Patches that a word lights up", "word_patches.png",
                                paragraph(f"Weight of the word in each of the {patches.grid[0]}x{patches.grid[1]} "
                                          "patch lexical vectors (before the max over patches), scaled per picture. The adapter's "
                                          "self-attention lets every patch see the whole image and training only "
                                          "supervises the max over patches, so a word may also light up "
                                          "background patches.", "note")))
    patch_words_figure(pictures[0], patch_top_words(model, patches, 0, k=1), patches.grid,
                       out_dir / "patch_words.png", title=f"top word of every patch: {titles[0]}")
    sections.append(HtmlSection("Top word of every patch", "patch_words.png"))

    rows = [[k, v] for k, v in summary.items()]
    sections.append(HtmlSection("Run", body=words_table(rows, ["", ""])))
    intro = (f"LexVLA ({html.escape(cfg.model)}) trained on easy-vqa on the CPU by `lexvla demo`: "
             "images and captions become vectors over one word vocabulary.")
    return write_html_page(out_dir / "index.html", "LexVLA demo: easy-vqa", sections, intro)


def _lexical(vectors: torch.Tensor):
    from .outputs import LexicalOutput

    return LexicalOutput(vectors)


# ------------------------------------------------------------------------------------------- driver
def run_demo(cfg: DemoConfig) -> DemoResult:
    """The whole demo; see the module docstring. Returns the numbers and where the report is."""
    from safetensors.torch import load_file

    from . import load
    from .models.lexvla import WEIGHTS_FILE
    from .train import train
    from .train.trainer import TrainResult

    _register_balanced_source()
    clock = _Clock()
    text_frozen = _model_is_text_frozen(cfg.model)

    say("[1/5] easy-vqa: recovering colour + shape labels")
    train_ds = _load_split("train", EasyVQAConfig(check_pixels=cfg.check_pixels))
    if cfg.train_images:
        train_ds = train_ds.head(cfg.train_images)
    key = cfg.train_key(train_ds.fingerprint())
    run_dir = _cache_roots(cfg)["runs"] / key
    model_dir = run_dir / "model"
    tcfg = _train_config(cfg, run_dir, text_frozen)
    clock.lap("data")

    trained_now = cfg.retrain or not (run_dir / "result.json").is_file() or not model_dir.is_dir()
    if trained_now:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # the demo's own cache folder: a stale or partial run
        say(f"[2/5] loading {cfg.model}; backbone features of {len(train_ds)} train images and caption vectors "
            "(cached for later runs)")
        model = _build_like_trainer(tcfg)
        _prebuild_caches(tcfg, model, cfg.progress)
        clock.lap("features")
        say(f"[3/5] training {cfg.model} for {cfg.steps} steps of {cfg.batch_size} class-balanced pairs")
        tr = train(tcfg)
        clock.lap("train")
        model.load_trained(load_file(model_dir / WEIGHTS_FILE))  # same architecture: no second LLM load
    else:
        say(f"[2/5] backbone features: cached\n[3/5] trained model: cached in {run_dir} (--retrain to train again)")
        tr = TrainResult(**json.loads((run_dir / "result.json").read_text()))
        model = load(model_dir)
    say("[4/5] zero-shot retrieval on the easy-vqa test split")
    ev = _evaluate(model, cfg, cfg.progress)
    clock.lap("evaluate")

    say("[5/5] writing the report")
    out_dir = Path(cfg.output_dir)
    summary = {"model": cfg.model, "checkpoint": str(model_dir), "trained in this run": "yes" if trained_now else
               "no (cached)", "steps": tr.steps, "batch": f"{cfg.batch_size} (one image per class)",
               "training time (s)": float(tr.seconds), "training pairs/s": float(tr.pairs_per_second),
               "demo wall time so far (s)": float(clock.total)}
    report = _write_report(out_dir, model, cfg, ev, _read_metrics(run_dir), summary)
    clock.lap("report")
    res = ev.result
    result = DemoResult(
        report=str(report), model_dir=str(model_dir),
        i2t={f"R@{k}": v for k, v in res.image_to_text.recall.items()},
        t2i={f"R@{k}": v for k, v in res.text_to_image.recall.items()},
        active_words=dict(res.active_words), num_test_images=res.num_images, num_test_texts=res.num_texts,
        trained_now=trained_now, train_seconds=float(tr.seconds), pairs_per_second=float(tr.pairs_per_second),
        seconds=clock.total, timings=dict(clock.stages))
    (out_dir / "results.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result


# ------------------------------------------------------------------------------------------- CLI
def _run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, train_images=args.train_images or None,
                     test_images=args.test_images, output_dir=args.out, retrain=args.retrain,
                     progress=not args.no_progress, seed=args.seed, check_pixels=not args.no_pixel_check)
    say(f"LexVLA demo: trains {cfg.model} on easy-vqa on the CPU, evaluates zero-shot retrieval and writes "
        f"a report to {cfg.output_dir}/.\nIt takes under {TIME_LIMIT_MINUTES} minutes on a 2-core CPU the first "
        "time (about 1 minute once the features and the trained model are cached).")
    result = run_demo(cfg)
    say("")
    say(f"image -> text  R@1 {result.i2t['R@1']:.3f}  R@5 {result.i2t['R@5']:.3f}  R@10 {result.i2t['R@10']:.3f}")
    say(f"text -> image  R@1 {result.t2i['R@1']:.3f}  R@5 {result.t2i['R@5']:.3f}  R@10 {result.t2i['R@10']:.3f}")
    say(f"mean active words (1/sqrt(V) threshold): {result.active_words['image']:.0f} per image, "
        f"{result.active_words['text']:.0f} per caption")
    say(f"({result.num_test_images} test images, {result.num_test_texts} captions; "
        f"{'trained now' if result.trained_now else 'trained model from the cache'}; "
        f"{result.seconds / 60:.1f} min in all)")
    say(f"report: {Path(result.report).resolve()}")
    return 0


def register(subparsers) -> None:
    d = DemoConfig()
    p = subparsers.add_parser("demo", help="train LexVLA on the easy-vqa toy set on the CPU and write a report",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model, help="zoo name or checkpoint folder to start from (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="pairs per batch, all of different colour x shape classes (default: %(default)s)")
    p.add_argument("--train-images", type=int, default=d.train_images,
                   help="train on the first N train images, 0 = all (default: %(default)s)")
    p.add_argument("--test-images", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--out", default=d.output_dir, help="report folder (default: %(default)s)")
    p.add_argument("--retrain", action="store_true", help="train again even if a trained model is cached")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-pixel-check", action="store_true",
                   help="skip easy-vqa's pixel cross-check of the recovered colours (faster start)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lexvla")
    register(parser.add_subparsers())
    args = parser.parse_args(list(argv) if argv is not None else None)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
