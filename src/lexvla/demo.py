"""``lexvla demo``: train LexVLA and a dense (CLIP-style) baseline on emoji on the CPU, compare them
zero-shot on held-out concepts, subgroups and styles, and write a report.

Both models share the frozen backbone (features cached), the LLM with LoRA on its top layers, the data
and the trainer; they differ in the output: words (LexVLA) or a latent embedding (dense). The trained
LexVLA becomes the trained default of its zoo name, so ``create_model("lexvla-embedded")`` and every
``lexvla`` command that takes that name use it from then on. ``--data easy-vqa`` runs the same steps on
the easy-vqa toy set (quick checks and the tests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TIME_LIMIT_MINUTES = 15


def say(message: str) -> None:
    """Demo narration on stdout (the library logs; the command talks to the user)."""
    print(message, flush=True)


@dataclass(frozen=True)
class DemoData:
    """What one demo preset trains on and evaluates."""

    source: str
    options: dict[str, Any]
    retrieval: dict[str, tuple[str, str]]  # report label -> (retrieval set, split); the first is the main one
    patchdis: tuple[str, str] | None
    prompt: str  # PatchDis class prompt
    balanced: bool = False  # easy-vqa: batches laid out by the source, read in order
    # PatchDis encode size, the grid scaled to keep the trained patch stride (None: the model's own). The
    # collages are 224 px with objects of 67-134 px: at 224 px an object lies on 4-8 patches of 16 px (a
    # training emoji: 4x4 patches of 16 px) instead of 1-2 patches at 64 px.
    patchdis_image_size: int | None = None


PRESETS: dict[str, DemoData] = {
    "emoji": DemoData(
        "emoji-heldout", {"styles": ["noto", "openmoji"], "splits": ["train", "subgroups-train"],
                          "captions": ["emoji"], "caption_mode": "random"},
        {"held-out concepts (Noto)": ("emoji-noto", "test"),
         "held-out subgroups (Noto)": ("emoji-noto", "subgroups-test"),
         "held-out concepts, unseen style (Fluent 3D)": ("emoji-fluent", "test")},
        ("emoji-collages", "test"), "an emoji of {}.", patchdis_image_size=224),
    "easy-vqa": DemoData("easy-vqa-balanced", {"split": "train"}, {"easy-vqa test": ("easy-vqa", "test")},
                         ("easy-vqa", "test"), "a {}.", balanced=True),
}


@dataclass
class DemoConfig:
    """What ``lexvla demo`` runs. The defaults are the measured demo (docs/training.md, "The demo")."""

    model: str = "lexvla-embedded"
    data: str = "emoji"
    steps: int = 60  # 120 was not measured (no heavy-lock turn), and PatchDis at 224 px already costs ~5 min of the budget
    batch_size: int = 32
    lr: float = 1e-3  # adapter, visual codebook, temperature
    lr_lora: float = 5e-4
    regulariser_weight: float = 1e-3
    dense: bool = True  # train and compare the dense baseline
    train_images: int | None = None  # easy-vqa: first N train images
    test_images: int | None = None  # first N images of each retrieval set
    collages: int = 100  # PatchDis collages
    # Training collages of TRAIN-concept emoji added to the emoji pairs (lexvla.data.train_collages); 0 = none
    train_collages: int = 0
    # PatchDis encode size (grid scaled to keep the trained patch stride); None = the preset's
    patchdis_image_size: int | None = None
    output_dir: str = "reports/demo"
    cache_dir: str | None = None  # root of the demo's caches (None = the project cache, $LEXVLA_CACHE)
    retrain: bool = False
    seed: int = 0
    examples: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        if self.data not in PRESETS:
            raise ValueError(f"data must be one of {sorted(PRESETS)}, got {self.data!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (a contrastive batch), got {self.batch_size}")
        for name in ("train_images", "test_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if self.examples < 1 or self.collages < 1:
            raise ValueError("examples and collages must be >= 1")
        if self.train_collages < 0:
            raise ValueError(f"train_collages must be >= 0, got {self.train_collages}")

    def train_key(self, model_config: dict[str, Any]) -> str:
        """Identity of the trained checkpoints: everything that changes the trained weights."""
        fields = {k: v for k, v in asdict(self).items()
                  if k not in ("output_dir", "cache_dir", "retrain", "examples", "progress", "test_images", "collages",
                           "patchdis_image_size")}
        if not fields["train_collages"]:  # off: the key of the runs trained before the option existed
            del fields["train_collages"]
        payload = json.dumps({"demo": fields, "model": model_config, "version": 2}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class DemoResult:
    report: str
    model_dir: str
    retrieval: dict[str, dict[str, Any]]  # label -> {"lexvla": {...}, "dense": {...}}
    patchdis: dict[str, float | None]
    overused_before: list[tuple[str, float]]
    overused_after: list[tuple[str, float]]
    top5_share: dict[str, float]
    trained_now: bool
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Clock:
    def __init__(self) -> None:
        self.start = self._t = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = round(self.stages.get(name, 0.0) + now - self._t, 1)
        self._t = now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


# ------------------------------------------------------------------------------------------- training
def _train_config(cfg: DemoConfig, out: Path, dense: bool):
    from .train import TrainConfig

    preset = PRESETS[cfg.data]
    options = dict(preset.options)
    source = preset.source
    if cfg.train_collages and cfg.data == "emoji":
        from .data.train_collages import SOURCE as COLLAGE_SOURCE

        source = COLLAGE_SOURCE
        options["collages"] = {"count": cfg.train_collages}
    if preset.balanced:
        options.update(batch_size=cfg.batch_size, batches=cfg.steps, check_pixels=False)
        if cfg.train_images:
            options["limit"] = cfg.train_images
    base = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None
    return TrainConfig.from_dict({
        "model": {"name": cfg.model},
        "data": {"source": source, "options": options, "batch_size": cfg.batch_size,
                 "shuffle": not preset.balanced,
                 "feature_cache": str(base / "train" / "features") if base else "auto"},
        "optim": {"lr": {"adapter": cfg.lr, "visual_codebook": cfg.lr, "lora": cfg.lr_lora, "temperature": cfg.lr},
                  "weight_decay": {"adapter": 0.0}, "warmup_steps": min(20, cfg.steps - 1)},
        "loss": {"regulariser": "none" if dense else "overuse", "image_weight": cfg.regulariser_weight,
                 "text_weight": cfg.regulariser_weight, "ramp_steps": cfg.steps // 3},
        "steps": cfg.steps, "log_every": max(1, min(10, cfg.steps // 20)), "checkpoint_every": 0,
        "keep_checkpoints": 1, "output_dir": str(out), "seed": cfg.seed, "tensorboard": False,
        "progress": cfg.progress, "cpu": True,
    })


def _train_or_load(cfg: DemoConfig, tcfg: Any, build) -> tuple[Any, bool]:
    """The run in ``tcfg.output_dir``: loaded when finished before, else trained now."""
    from . import load
    from .train import train

    out = Path(tcfg.output_dir)
    if not cfg.retrain and (out / "result.json").is_file() and (out / "model").is_dir():
        return load(out / "model"), False
    model = build()
    train(tcfg, model=model)
    return model.eval(), True


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    from .train.tracking import METRICS_FILE

    path = run_dir / METRICS_FILE
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


# ------------------------------------------------------------------------------------------- evaluation
def _retrieval(model: Any, data: Any, spars: Any, progress: bool):
    from .eval.retrieval import RetrievalConfig, encode_set, retrieval_from_vectors

    enc = encode_set(model, data, RetrievalConfig(cache=False, progress=progress, sparsification="none"))
    return enc, retrieval_from_vectors(enc.images, enc.texts, data, spars, "pessimistic", (1, 5, 10))


def _row(r: Any) -> dict[str, Any]:
    return {"i2t": {f"R@{k}": v for k, v in r.image_to_text.recall.items()},
            "t2i": {f"R@{k}": v for k, v in r.text_to_image.recall.items()}, "words": dict(r.active_words),
            "images": r.num_images, "texts": r.num_texts}


def _curve(enc: Any, data: Any, path: Path, dense_r1: tuple[float, float] | None) -> Path:
    from .eval.figures import sparsity_plot
    from .eval.retrieval import retrieval_from_vectors
    from .eval.sparsity import sparsity_settings

    points = []
    v = enc.images.shape[1]
    for s in sparsity_settings(v, (0.0, 1.0, 2.0, 4.0), (512, 256, 128, 64, 32, 16, 8)):
        r = retrieval_from_vectors(enc.images, enc.texts, data, s, "pessimistic", (1, 5))
        points.append({"mode": s.mode, "value": r.sparsification["value"], "active_image": r.active_words["image"],
                       "active_text": r.active_words["text"],
                       "active_words": (r.active_words["image"] + r.active_words["text"]) / 2,
                       "image_to_text": {f"R@{k}": x for k, x in r.image_to_text.recall.items()},
                       "text_to_image": {f"R@{k}": x for k, x in r.text_to_image.recall.items()}})
    title = "R@1 vs active words (held-out concepts)"
    if dense_r1:
        title += f"; dense R@1 {dense_r1[0]:.2f} / {dense_r1[1]:.2f}"
    return sparsity_plot(points, path, title)


# ------------------------------------------------------------------------------------------- driver
def run_demo(cfg: DemoConfig) -> DemoResult:
    from .data.sampling import register_sources
    from .eval import (
        PatchDisConfig,
        RetrievalDataConfig,
        SegDataConfig,
        evaluate_patchdis,
        load_retrieval_set,
    )
    from .eval.sparsity import overused_outside_caption, top_word_share
    from .models.dense import DenseBaseline
    from .models.zoo import find_trained, get_config, list_models, save_trained
    from .sparsification import Sparsification

    register_sources()
    preset = PRESETS[cfg.data]
    clock = _Clock()
    _ensure_data(cfg)
    clock.lap("data")
    zoo_name = cfg.model if cfg.model in list_models() else None
    model_cfg = get_config(zoo_name).to_dict() if zoo_name else {"path": str(Path(cfg.model).resolve())}
    key = cfg.train_key(model_cfg)
    from ._assets import cache_dir

    runs = (Path(cfg.cache_dir).expanduser() / "demo" if cfg.cache_dir else cache_dir("demo")) / key
    lex_cfg, dense_cfg = _train_config(cfg, runs / "lexvla", False), _train_config(cfg, runs / "dense", True)

    main_label, (main_set, main_split) = next(iter(preset.retrieval.items()))
    main_data = load_retrieval_set(main_set, RetrievalDataConfig(split=main_split, limit=cfg.test_images,
                                                                 captions_per_image=None))
    holder: dict[str, Any] = {}

    def build_lexvla():
        from accelerate.utils import set_seed

        from . import load
        from .models import create_model
        from .models.lexvla import UntrainedModelWarning

        set_seed(cfg.seed)
        # from the zoo entry itself, never from an earlier trained default of it; an untrained model is
        # what training starts from, so its warning (as in the trainer's build_model) would only mislead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UntrainedModelWarning)
            model = (create_model(zoo_name, trained=False) if zoo_name else load(cfg.model)).eval()
        holder["before"] = model.encode_text(main_data.texts).vectors  # the untrained text side (LoRA = 0)
        return model

    say(f"[1/4] training {cfg.model} ({cfg.steps} steps of {cfg.batch_size}; features and the LLM's frozen "
        "layers computed once, cached)")
    lex, trained_now = _train_or_load(cfg, lex_cfg, build_lexvla)
    before_file = runs / "before.safetensors"
    from safetensors.torch import load_file, save_file

    if "before" in holder:
        save_file({"v": holder["before"].contiguous()}, str(before_file))
    before = load_file(str(before_file))["v"] if before_file.is_file() else None
    clock.lap("train lexvla")
    dense = None
    if cfg.dense:
        say("[2/4] training the dense baseline on the same features, data and LLM")

        def build_dense():
            base = get_config(zoo_name) if zoo_name else lex.config
            d = DenseBaseline(base).train()
            if d.config.text == lex.config.text:
                d.text._prefix = lex.text._prefix  # same frozen lower layers: reuse their states
            return d

        dense, _ = _train_or_load(cfg, dense_cfg, build_dense)
        clock.lap("train dense")
    if zoo_name and cfg.data == "emoji":
        save_trained(lex, zoo_name)
        say(f"      {zoo_name} now loads these trained weights ({find_trained(zoo_name)})")

    say("[3/4] zero-shot retrieval and PatchDis on held-out data")
    lex.eval()
    lex.text.keep_prefix = True
    spars = Sparsification()  # the paper's 1/sqrt(V) threshold
    retrieval: dict[str, dict[str, Any]] = {}
    main_enc = None
    for label, (name, split) in preset.retrieval.items():
        data = main_data if label == main_label else load_retrieval_set(
            name, RetrievalDataConfig(split=split, limit=cfg.test_images, captions_per_image=None))
        enc, r = _retrieval(lex, data, spars, cfg.progress)
        retrieval[label] = {"lexvla": _row(r)}
        if label == main_label:
            main_enc = enc
        if dense is not None:
            retrieval[label]["dense"] = _row(_retrieval(dense, data, Sparsification.none(), cfg.progress)[1])
    txt, img = spars(main_enc.texts), spars(main_enc.images)
    words = list(lex.vocab.words)
    after = [(w.word, w.active_share) for w in overused_outside_caption(txt, main_data.texts, words, 10)]
    before_words = ([(w.word, w.active_share) for w in overused_outside_caption(
        spars(before), main_data.texts, words, 10)] if before is not None else [])
    hit = (txt @ img.T).argmax(1)  # each caption's top image
    shares = top_word_share(txt, img[hit], k=5)
    top5 = {"mean": float(shares.mean()), "median": float(shares.median()),
            "share_of_hits_at_least_half": float((shares >= 0.5).float().mean())}

    patchdis: dict[str, float | None] = {}
    seg = None
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if preset.patchdis:
        name, split = preset.patchdis
        from .eval import load_segmentation_set

        seg = load_segmentation_set(name, SegDataConfig(split=split, limit=cfg.collages))
        pd_size = cfg.patchdis_image_size or preset.patchdis_image_size
        # Both models by the same code and settings; two protocols: every test concept competes for every
        # patch (the paper's), and only the concepts present in the collage (keys with "_present").
        for kind, m in (("lexvla", lex), ("dense", dense)):
            if m is None:
                continue
            for classes, suffix in (("all", ""), ("present", "_present")):
                first = kind == "lexvla" and classes == "all"
                r = evaluate_patchdis(m, seg, PatchDisConfig(
                    prompt=preset.prompt, figures=2 if first else 0, progress=cfg.progress, classes=classes,
                    image_size=pd_size, sparsification="threshold" if kind == "lexvla" else "none"),
                    out_dir if first else None)
                patchdis[kind + suffix] = r.miou
                patchdis[f"{kind}{suffix}_localisation_auc"] = r.localisation_auc
                if first:
                    patchdis["figures"] = r.figures  # type: ignore[assignment]
                    patchdis["grid"] = list(r.grid) if r.grid else None  # type: ignore[assignment]
        patchdis["image_size"] = pd_size  # type: ignore[assignment]
    clock.lap("evaluate")

    say("[4/4] writing the report")
    from .viz.report import write_demo_report as write_report

    result = DemoResult(report="", model_dir=str(runs / "lexvla" / "model"), retrieval=retrieval, patchdis=patchdis,
                        overused_before=before_words, overused_after=after, top5_share=top5, trained_now=trained_now,
                        seconds=0.0, timings=dict(clock.stages))
    result.report = str(write_report(out_dir, cfg, lex, dense, main_data, main_enc, seg, preset, result,
                                     _metrics(runs / "lexvla")))
    clock.lap("report")
    result.seconds, result.timings = round(clock.total, 1), dict(clock.stages)
    (out_dir / "results.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result


def _ensure_data(cfg: DemoConfig) -> None:
    """Emoji: prepare the three styles once (sha256-pinned registry packages; ~4 minutes the first time)."""
    if cfg.data != "emoji":
        return
    from .data.emoji import emoji_root, fetch_emoji

    missing = [s for s in ("noto", "openmoji", "fluent") if not (emoji_root() / s / "pairs.jsonl").is_file()]
    if missing:
        say(f"[0/4] preparing the emoji styles {missing} (once)")
        fetch_emoji(styles=missing)


# ------------------------------------------------------------------------------------------- CLI
def _run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(model=args.model, data=args.data, steps=args.steps, batch_size=args.batch_size,
                     dense=not args.no_dense, train_images=args.train_images or None, test_images=args.test_images,
                     train_collages=args.train_collages, patchdis_image_size=args.patchdis_image_size,
                     output_dir=args.out, retrain=args.retrain, progress=not args.no_progress, seed=args.seed)
    say(f"LexVLA demo: trains {cfg.model} and a dense baseline on {cfg.data} on the CPU, evaluates them zero-shot "
        f"on held-out data and writes a report to {cfg.output_dir}/ (first run: under {TIME_LIMIT_MINUTES} "
        "minutes on 2 cores; cached afterwards).")
    r = run_demo(cfg)
    say("")
    for label, row in r.retrieval.items():
        for kind, m in row.items():
            say(f"{label:<46} {kind:<7} I->T R@1 {m['i2t']['R@1']:.3f} R@5 {m['i2t']['R@5']:.3f}  "
                f"T->I R@1 {m['t2i']['R@1']:.3f} R@5 {m['t2i']['R@5']:.3f}  words {m['words']['image']:.0f}/"
                f"{m['words']['text']:.0f}")
    if r.patchdis:
        pd = r.patchdis
        say(f"PatchDis mIoU (all test concepts / concepts present): lexvla {_num(pd.get('lexvla'))} / "
            f"{_num(pd.get('lexvla_present'))}, dense {_num(pd.get('dense'))} / {_num(pd.get('dense_present'))}")
    say(f"top-5 shared words carry {100 * r.top5_share['mean']:.0f}% of a hit's score (mean)")
    say(f"({'trained now' if r.trained_now else 'trained models from the cache'}; {r.seconds / 60:.1f} min)")
    say(f"report: {Path(r.report).resolve()}")
    return 0


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def register(subparsers) -> None:
    d = DemoConfig()
    p = subparsers.add_parser("demo", help="train LexVLA and a dense baseline on emoji on the CPU and write a report",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model, help="zoo name or checkpoint folder to start from (default: %(default)s)")
    p.add_argument("--data", default=d.data, choices=sorted(PRESETS), help="preset (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per batch (default: %(default)s)")
    p.add_argument("--train-images", type=int, default=d.train_images, help="easy-vqa: first N train images")
    p.add_argument("--test-images", type=int, default=None, help="evaluate on the first N images of each set")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("--train-collages", type=int, default=d.train_collages,
                   help="emoji: add N training collages of training-concept emoji (default: %(default)s)")
    p.add_argument("--patchdis-image-size", type=int, default=d.patchdis_image_size,
                   help="PatchDis encode size, grid scaled to keep the patch stride (default: the preset's, emoji 224)")
    p.add_argument("--out", default=d.output_dir, help="report folder (default: %(default)s)")
    p.add_argument("--retrain", action="store_true", help="train again even if trained models are cached")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lexvla.demo ARGS`` = ``lexvla demo ARGS`` (the command's logging and output policy)."""
    from .cli import main as lexvla_main

    return lexvla_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())


