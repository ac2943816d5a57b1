"""Training metrics to ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def drop_records_after(path: str | Path, step: int) -> None:
    """Remove the JSONL records of ``path`` whose ``step`` is past ``step`` (written by a run that was
    killed after its last checkpoint), so a resumed log reads like one uninterrupted run."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(f"{line}\n" for line in kept))


class MetricsLogger:
    """Append-only metric records; on resume, records after the checkpoint's step (written by the run that
    was killed) are dropped so the file reads like one uninterrupted run."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            drop_records_after(self.path, resume_step)
        elif resume_step is None and self.path.is_file():
            self.path.unlink()  # a fresh run in an old folder starts a fresh log
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed (pip install 'lexvla[train]'); metrics go to %s only",
                               self.path)
            else:
                # purge_step drops events the killed run wrote after the checkpoint
                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def record(self, entry: dict) -> None:
        """A non-scalar record (the run's setup) in metrics.jsonl only."""
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
