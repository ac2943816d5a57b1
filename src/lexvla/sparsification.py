"""The one sparsification object: which lexical weights survive before any similarity or index.

Every consumer uses :class:`Sparsification`: the model's default (``MapperConfig.threshold/topk`` ->
``LexVLA.sparsification``), the evaluations, the index (documents and queries), the web demo and the
command line (``--sparsify SPEC``, one spelling everywhere, see :meth:`Sparsification.parse`). The
paper's default threshold 1/sqrt(V) is computed in one place, :meth:`Sparsification.threshold_for`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

INV_SQRT_V = "inv_sqrt_v"  # threshold = 1/sqrt(V): an L2-normalised vector spread evenly over V words
SPEC_HELP = ("'threshold' (1/sqrt(V), the paper's), 'threshold:T', 'topk:K', both joined by ',' "
             "(e.g. 'threshold,topk:64'), or 'none' (dense)")


@dataclass(frozen=True)
class Sparsification:
    """Keep the weights ``> threshold`` and/or among each vector's ``topk`` largest; zero the rest.

    ``threshold``: a number, ``"inv_sqrt_v"`` (1/sqrt(V), V = the vectors' width) or None (no threshold).
    ``topk``: at most this many words per vector, or None. Vectors are not re-normalised afterwards
    (the paper compares the pruned vectors as they are). Ties at the k-th weight keep exactly k words.
    """

    threshold: float | str | None = INV_SQRT_V
    topk: int | None = None

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, str) and t != INV_SQRT_V:
            raise ValueError(f"sparsification threshold must be a number, {INV_SQRT_V!r} or None, got {t!r}")
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            if t < 0:
                raise ValueError(f"sparsification threshold must be >= 0, got {t}")
            object.__setattr__(self, "threshold", float(t))
        if self.topk is not None:
            if int(self.topk) != self.topk or self.topk < 1:
                raise ValueError(f"sparsification topk must be a positive integer, got {self.topk!r}")
            object.__setattr__(self, "topk", int(self.topk))

    # ------------------------------------------------------------------ spelling
    @classmethod
    def none(cls) -> Sparsification:
        return cls(None, None)

    @classmethod
    def parse(cls, spec: str | Sparsification | None) -> Sparsification:
        """The command-line spelling: ``threshold`` | ``threshold:T`` | ``topk:K`` | both joined by ``,``
        | ``none``. ``None`` or a :class:`Sparsification` pass through (None = the default)."""
        if spec is None:
            return cls()
        if isinstance(spec, Sparsification):
            return spec
        text = str(spec).strip().lower()
        if text in ("none", "dense"):
            return cls.none()
        threshold: float | str | None = None
        topk: int | None = None
        try:
            for part in text.split(","):
                key, _, value = part.strip().partition(":")
                if key == "threshold":
                    threshold = INV_SQRT_V if value in ("", "auto", INV_SQRT_V) else float(value)
                elif key == "topk" and value:
                    topk = int(value)
                else:
                    raise ValueError(f"unknown part {part.strip()!r}")
            return cls(threshold, topk)
        except ValueError as err:
            raise ValueError(f"bad sparsification {spec!r} ({err}); use {SPEC_HELP}") from None

    def __str__(self) -> str:
        parts = []
        if self.threshold == INV_SQRT_V:
            parts.append("threshold")
        elif self.threshold is not None:
            parts.append(f"threshold:{self.threshold:g}")
        if self.topk is not None:
            parts.append(f"topk:{self.topk}")
        return ",".join(parts) or "none"

    @property
    def mode(self) -> str:
        """"threshold", "topk", "threshold+topk" or "none" (for reports and plots)."""
        return "+".join(m for m, v in (("threshold", self.threshold), ("topk", self.topk)) if v is not None) or "none"

    # ------------------------------------------------------------------ values
    def threshold_for(self, vocab_size: int) -> float | None:
        """The numeric threshold for vectors of width ``vocab_size`` (the one place 1/sqrt(V) is computed)."""
        if self.threshold == INV_SQRT_V:
            return 1.0 / math.sqrt(vocab_size)
        return self.threshold  # type: ignore[return-value]

    def resolve(self, vocab_size: int) -> Sparsification:
        """The same setting with a numeric threshold (what an index records)."""
        return replace(self, threshold=self.threshold_for(vocab_size))

    def override(self, threshold: float | str | None = None, topk: int | None = None) -> Sparsification:
        """This setting with the given fields replaced where they are not None."""
        return Sparsification(self.threshold if threshold is None else threshold, self.topk if topk is None else topk)

    def describe(self, vocab_size: int) -> dict[str, Any]:
        t = self.threshold_for(vocab_size)
        value = t if self.mode == "threshold" else (float(self.topk) if self.mode == "topk" else None)
        return {"spec": str(self), "mode": self.mode, "threshold": t, "topk": self.topk, "value": value,
                "default_threshold": self.threshold == INV_SQRT_V}

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "topk": self.topk}

    # ------------------------------------------------------------------ applying
    def __call__(self, x: Any) -> Any:
        """Sparsify a (..., V) tensor, a scipy sparse matrix (-> CSR) or a ``LexicalOutput``."""
        import torch  # here, not at import: configs import this module and must stay light

        if isinstance(x, torch.Tensor):
            return self._tensor(x)
        if hasattr(x, "tocsr"):
            return self._csr(x)
        if hasattr(x, "vectors"):  # LexicalOutput
            patches = None if x.patch_vectors is None else self._tensor(x.patch_vectors)
            return replace(x, vectors=self._tensor(x.vectors), patch_vectors=patches)
        raise TypeError(f"cannot sparsify a {type(x).__name__}")

    def _tensor(self, v: Any) -> Any:
        import torch

        t = self.threshold_for(v.shape[-1])
        out = v
        if t is not None:
            out = out * (out > t)
        if self.topk is not None:
            idx = out.topk(min(self.topk, out.shape[-1]), dim=-1).indices
            out = out * torch.zeros_like(out, dtype=torch.bool).scatter_(-1, idx, True)
        return out

    def _csr(self, m: Any) -> Any:
        """CSR rows, on a copy; ties at the k-th weight keep the lower dimension."""
        import numpy as np
        import scipy.sparse as sp

        m = sp.csr_matrix(m, dtype=np.float32, copy=True)
        t = self.threshold_for(m.shape[1])
        if t is not None:
            m.data[m.data <= t] = 0
            m.eliminate_zeros()
        if self.topk is not None:
            for i in range(m.shape[0]):
                s, e = m.indptr[i], m.indptr[i + 1]
                if e - s > self.topk:
                    vals = m.data[s:e]
                    vals[np.lexsort((m.indices[s:e], -vals))[self.topk:]] = 0
            m.eliminate_zeros()
        return m
