"""Local web app: explained lexical image search (FastAPI + one plain HTML/JS page).

``lexvla serve idx/ --model M`` (see ``cli.py``); in code::

    service = SearchService(model, SparseIndex.open("idx/"))
    app = create_app(service)            # then run with uvicorn, or test with fastapi.testclient

FastAPI is an optional dependency (``pip install lexvla[web]``); the library never imports this package.
"""

from .app import create_app
from .service import SearchService, UploadError, WebConfig, decode_upload

__all__ = ["SearchService", "UploadError", "WebConfig", "create_app", "decode_upload"]
