"""``lexvla serve idx/ [--model M] [--host 127.0.0.1 --port 8000]``: the local search web app."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from .._cli import ModelSpec, add_model_argument

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def model_spec(given: ModelSpec | None, index: Any) -> ModelSpec:
    """``--model`` if given, else the model the index records (as `lexvla index build --model` spelled it)."""
    if given is not None:
        return given
    if not index.model_source:
        raise ValueError(f"the index {index.path} does not record its model; pass --model")
    return ModelSpec.parse(index.model_source)


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
        from .service import SearchService, WebConfig
    except ImportError as err:
        raise ValueError(f"the web app needs the 'web' extras ({err.name} is missing): "
                         "pip install 'lexvla[web]'") from None
    from ..index import SparseIndex

    if args.host not in LOOPBACK:
        logger.warning("serving on %s: anyone who can reach this address can search the index and see "
                       "its images (there is no authentication)", args.host)
    if args.torch_threads > 0:
        import torch

        # One intra-op thread per model call by default: on a shared machine more threads than free cores
        # make every encode wait for the slowest (docs/web.md measures it); requests run side by side instead.
        torch.set_num_threads(args.torch_threads)
    if args.switch_interval_ms:
        import sys

        # Encoder threads hand the GIL back and forth once per torch op (~1,200 per query encode); a
        # shorter switch interval lets a thread that finished an op continue sooner (docs/web.md).
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    index = SparseIndex.open(args.index, backend=args.backend)
    spec = model_spec(args.model, index)
    model = spec.build()
    config = WebConfig(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), workers=args.workers,
                       batch_size=args.batch_size, query_cache=args.query_cache,
                       torch_threads=max(args.torch_threads, 0), encoders=args.encoders,
                       fast_encode=not args.plain_encode)
    service = SearchService(model, index, config, model_name=str(spec))
    # Bound to loopback: accept only loopback Host headers (no DNS rebinding from a web page).
    hosts = ["127.0.0.1", "localhost", "[::1]", "::1"] if args.host in LOOPBACK else None
    app = create_app(service, allowed_hosts=hosts)
    print(f"lexvla: serving {args.index} ({service.n_items()} images) at http://{args.host}:{args.port}/ "
          f"(API docs at /api/docs); Ctrl-C stops")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        service.close()
        index.close()
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="local web app: explained image search over an index")
    p.add_argument("index", help="index folder (from `lexvla index build`)")
    add_model_argument(p, default=None, help="zoo name or checkpoint folder (default: the model the index records)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default=None, help="search backend (default: the index's own)")
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="largest accepted upload")
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=8, help="searches run at once (the rest queue)")
    p.add_argument("--batch-size", type=int, default=8, help="concurrent text queries encoded together at most")
    p.add_argument("--query-cache", type=int, default=512, help="query vectors kept (0: no cache)")
    p.add_argument("--encoders", type=int, default=0,
                   help="query encoder threads (0: one per core / torch thread, at most 4)")
    p.add_argument("--switch-interval-ms", type=float, default=0.0,
                   help="Python's GIL switch interval for the server's threads (0: Python's default, 5 ms)")
    p.add_argument("--plain-encode", action="store_true",
                   help="encode queries with the training code path (no merged LoRA, no cached prompt prefix)")
    p.set_defaults(func=_serve)
