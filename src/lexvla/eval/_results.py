"""Shared behaviour of evaluation results."""

from __future__ import annotations

import json
from pathlib import Path


class JSONResult:
    """``save(path)`` for result dataclasses that define ``to_dict()``: indented JSON, parents created."""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")  # type: ignore[attr-defined]
        return path
