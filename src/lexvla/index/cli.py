"""``lexvla index build|add|delete|info`` and ``lexvla search``.

Printed hits show rank, score, id (and path or caption) and the words that contribute most to the
score; ``--json`` prints every hit with all its shared words instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lexvla._cli import ModelSpec, add_model_argument
from lexvla.index.backends import list_backends
from lexvla.sparsification import SPEC_HELP, Sparsification


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # plain strings (URIs, names) need no quotes


def _backend_options(args: argparse.Namespace) -> dict:
    options: dict[str, Any] = {}
    for item in args.backend_option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--backend-option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = _parse_value(value)
    if getattr(args, "uri", None):
        options["uri"] = args.uri
    return options


@functools.lru_cache(maxsize=2)
def _create_model(source: str):
    return ModelSpec.parse(source).build()


def _load_model(source: ModelSpec | str | None, index_path: Path):
    """The model from ``--model`` or the spelling the index records (``NAME_OR_PATH [key=value ...]``);
    cached: commands run in one process share it."""
    if not source:
        raise ValueError(f"the index {index_path} does not record its model; pass --model")
    return _create_model(str(ModelSpec.parse(source)))


def _add_backend_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--backend", choices=list_backends(), default=default,
                   help="search backend" + (" (default: the one the index was built with)" if default is None else ""))
    p.add_argument("--uri", help="milvus: a Milvus Lite file (*.db) or a server/cluster, e.g. http://host:19530")
    p.add_argument("--backend-option", "-o", action="append", metavar="KEY=VALUE",
                   help="backend option, e.g. -o n_postings=2000 (seismic) or -o token=user:pw (milvus)")


def _print_report(report, as_json: bool) -> None:
    if as_json:
        _out(json.dumps({**asdict(report), "n_skipped": report.n_skipped}, indent=1))
        return
    _out(f"index {report.out} ({report.backend}): {report.images_added} images added, "
         f"{report.images_already_indexed} already indexed; {report.captions_added} captions added, "
         f"{report.captions_already_indexed} already indexed; {report.n_skipped} item(s) skipped "
         f"in {report.seconds:.1f}s")
    for s in report.skipped[:20]:
        _out(f"  skipped {s.path or s.id}: {s.reason}")
    if report.n_skipped > 20:
        _out(f"  ... and {report.n_skipped - 20} more")


def _build(args: argparse.Namespace) -> int:
    if args.images is None and args.captions is None and args.shards is None:
        raise ValueError("index build: give --images, --captions and/or --shards")
    from lexvla.index.build import build_index
    from lexvla.index.core import INDEX_FILE, SparseIndex

    out = Path(args.out)
    source = args.model
    if source is None and (out / INDEX_FILE).is_file():
        source = SparseIndex.open(out).model_source
    source = ModelSpec.parse(source or "lexvla-embedded")
    model = _load_model(source, out)
    from lexvla.index import distributed

    rank, world = distributed.launch_rank_world()
    if world > 1:  # under torchrun / accelerate launch: this rank's shards into its own part, then one merge
        return _build_launched(args, model, source, out, rank, world)
    report = build_index(model, images=args.images, out=out, backend=args.backend, batch_size=args.batch_size,
                         captions=args.captions, sparsify=args.sparsify,
                         backend_options=_backend_options(args), progress=not args.no_progress,
                         model_source=str(source), shards=args.shards)
    _print_report(report, args.json)
    return 0


def _build_launched(args: argparse.Namespace, model, source, out: Path, rank: int, world: int) -> int:
    from functools import partial

    from lexvla.index import distributed
    from lexvla.index.build import build_index

    if args.shards is None or args.images is not None or args.captions is not None:
        raise ValueError(f"index build launched as {world} ranks: give --shards only (each rank encodes every "
                         f"{world}-th shard); --images/--captions are read by one process")
    build = partial(build_index, model, batch_size=args.batch_size, sparsify=args.sparsify, backend="exact",
                    sync=False, progress=not args.no_progress and rank == 0, model_source=str(source))
    _print_report(distributed.build_rank_part(build, out, args.shards, rank, world), args.json)
    if rank == 0:
        report = distributed.wait_and_merge(out, world, backend=args.backend,
                                            backend_options=_backend_options(args))
        _out(json.dumps(report.to_dict(), indent=1) if args.json else
             f"merged {world} parts into {report.out}: {report.rows} rows in {report.seconds:.1f}s")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from lexvla.index.distributed import merge_indexes

    report = merge_indexes(args.parts, args.out, backend=args.backend, backend_options=_backend_options(args))
    _out(json.dumps(report.to_dict(), indent=1) if args.json else
         f"merged {len(report.parts)} parts into {report.out}: {report.rows} rows in {report.seconds:.1f}s")
    return 0


def _add(args: argparse.Namespace) -> int:
    from lexvla.index.build import build_index
    from lexvla.index.core import SparseIndex

    index = SparseIndex.open(args.index)
    if args.images is None and args.captions is None and args.shards is None:
        raise ValueError("index add: give --images, --captions and/or --shards")
    model = _load_model(args.model or index.model_source, Path(args.index))
    report = build_index(model, images=args.images, out=args.index, backend=index.backend_name,
                         batch_size=args.batch_size, captions=args.captions,
                         backend_options=_backend_options(args), progress=not args.no_progress,
                         shards=args.shards)
    _print_report(report, args.json)
    return 0


def _delete(args: argparse.Namespace) -> int:
    from lexvla.index.core import SparseIndex

    with SparseIndex.open(args.index, backend=args.backend, backend_options=_backend_options(args)) as index:
        rows = index.delete(args.ids, args.collection)
        index.sync()  # keep Milvus/Seismic in step now rather than at the next query
    already = len(set(args.ids)) - len(rows)
    _out(f"deleted {len(rows)} item(s) from {args.index}/{args.collection}"
         + (f" ({already} deleted before)" if already else ""))
    return 0


def _info(args: argparse.Namespace) -> int:
    from lexvla.index.core import SparseIndex

    with SparseIndex.open(args.index) as index:
        info = index.info()
    if args.json:
        _out(json.dumps(info.to_dict(), indent=1))
        return 0
    m = info.model
    _out(f"index {info.path}\n  model {m.name} (fingerprint {m.fingerprint}), vocabulary {m.dim} words "
         f"({m.vocab_fingerprint})\n  sparsify {info.sparsify}"
         f"\n  backend {info.backend}")
    for name, c in info.collections.items():
        _out(f"  {name}: {c['items']} items ({c['deleted']} deleted), {c['avg_active_words']:.0f} active words "
             f"on average, {c['store_bytes'] / 2**20:.1f} MiB in {c['shards']} shard(s)")
    return 0


def _search(args: argparse.Namespace) -> int:
    from lexvla.index.core import SparseIndex

    if (args.query is None) == (args.image is None):
        raise ValueError("search: give either a text query or --image (not both)")
    index = SparseIndex.open(args.index, backend=args.backend, backend_options=_backend_options(args))
    results = {}
    with index:
        if args.target:
            targets = [args.target]
        else:  # an image query also searches the captions when the index has them
            targets = ["images"] + (["texts"] if args.image and index.has_collection("texts") else [])
        for target in targets:
            if not index.has_collection(target):
                hint = " (build it with --captions)" if target == "texts" else ""
                raise ValueError(f"the index {args.index} has no {target}{hint}")
        model = _load_model(args.model or index.model_source, Path(args.index))
        settings = {"sparsify": args.sparsify}
        for target in targets:
            if args.image:
                results[target] = index.search_image(model, [args.image], k=args.k, collection=target, **settings)[0]
            else:
                results[target] = index.search_text(model, [args.query], k=args.k, collection=target, **settings)[0]
    if args.json:
        _out(json.dumps({"query": args.query or args.image, "backend": index.backend_name,
                         "results": {t: [h.to_dict() for h in hits] for t, hits in results.items()}}, indent=1))
        return 0
    for target, hits in results.items():
        if len(results) > 1:
            _out(f"-- {target}")
        if not hits:
            _out("no hits: the query shares no words with the indexed items")
        for h in hits:
            where = h.metadata.get("text") or h.metadata.get("path") or ""
            label = h.id if not where or where.endswith(h.id) else f"{h.id}  {where}"
            _out(f"{h.rank:3d}  {h.score:.4f}  {label}\n       {h.explanation.summary(args.words)}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``index`` (build, add, delete, info) and ``search`` to the ``lexvla`` command."""
    p = subparsers.add_parser("index", help="build and manage a sparse lexical index")
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    b = sub.add_parser("build", help="encode images (and captions) into an index; re-run to resume")
    add_model_argument(b, default=None, help="zoo name or checkpoint folder (default: the index's, else "
                                             "lexvla-embedded)")
    b.add_argument("--images", help="image folder, manifest (.txt / .jsonl) or a single image")
    b.add_argument("--captions", help="captions for image->text search: .txt (one a line) or .jsonl")
    b.add_argument("--shards", help="WebDataset tar shards of image + caption samples, e.g. 'data/{00000..00099}.tar'")
    b.add_argument("--out", required=True, help="index folder")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--sparsify", type=Sparsification.parse, metavar="SPEC",
                   help=f"document sparsification: {SPEC_HELP} (default: the model's own)")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--json", action="store_true")
    _add_backend_args(b, "exact")
    b.set_defaults(func=_build)

    a = sub.add_parser("add", help="add images / captions to an existing index")
    a.add_argument("index")
    a.add_argument("--images")
    a.add_argument("--captions")
    a.add_argument("--shards")
    add_model_argument(a, default=None, help="zoo name or checkpoint folder (default: the model the index records)")
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("--json", action="store_true")
    a.add_argument("--uri", help="milvus server/cluster address (if not the recorded one)")
    a.add_argument("--backend-option", "-o", action="append", metavar="KEY=VALUE")
    a.set_defaults(func=_add)

    d = sub.add_parser("delete", help="delete items by id")
    d.add_argument("index")
    d.add_argument("ids", nargs="+")
    d.add_argument("--collection", choices=("images", "texts"), default="images")
    _add_backend_args(d, None)
    d.set_defaults(func=_delete)

    m = sub.add_parser("merge", help="merge index parts (e.g. the per-rank parts of a launched build) into one")
    m.add_argument("parts", nargs="+", help="index folders built with the same model")
    m.add_argument("--out", required=True, help="the merged index (a new folder)")
    m.add_argument("--json", action="store_true")
    _add_backend_args(m, None)
    m.set_defaults(func=_merge)

    i = sub.add_parser("info", help="what an index holds and which model built it")
    i.add_argument("index")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_info)

    s = subparsers.add_parser("search", help="search an index by text or by image, with explanations")
    s.add_argument("index")
    s.add_argument("query", nargs="?", help="text query")
    s.add_argument("--image", help="image query (image -> images, or -> captions with --target texts)")
    s.add_argument("--target", choices=("images", "texts"),
                   help="collection to search (default: images; for --image also the captions, if indexed)")
    s.add_argument("-k", type=int, default=10, help="number of hits")
    add_model_argument(s, default=None, help="zoo name or checkpoint folder (default: the model the index records)")
    s.add_argument("--words", type=int, default=5, help="contributing words shown per hit")
    s.add_argument("--sparsify", type=Sparsification.parse, metavar="SPEC",
                   help=f"query sparsification: {SPEC_HELP} (default: as the documents)")
    s.add_argument("--json", action="store_true")
    _add_backend_args(s, None)
    s.set_defaults(func=_search)
