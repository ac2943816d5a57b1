"""Evaluation: zero-shot retrieval, PatchDis (patch-level mIoU) and sparsity analysis.

See ``docs/evaluation.md`` for exactly what is computed and how to reproduce the paper's tables.
"""

from .encode import Sparsification, VectorCache, encode_cached
from .metrics import (
    chunked_ranks,
    confusion_matrix,
    ranks_from_scores,
    recall_from_ranks,
    segmentation_scores,
)
from .patchdis import PatchDisConfig, PatchDisResult, evaluate_patchdis
from .retrieval import RetrievalConfig, RetrievalResult, evaluate_retrieval
from .retrieval_data import RETRIEVAL_DATASETS, RetrievalDataConfig, RetrievalSet, load_retrieval_set
from .segmentation_data import SEGMENTATION_DATASETS, SegDataConfig, SegmentationSet, load_segmentation_set
from .sparsity import SparsityReport, sparsity_analysis

__all__ = [
    "RETRIEVAL_DATASETS", "SEGMENTATION_DATASETS", "PatchDisConfig", "PatchDisResult", "RetrievalConfig",
    "RetrievalDataConfig", "RetrievalResult", "RetrievalSet", "SegDataConfig", "SegmentationSet", "Sparsification",
    "SparsityReport", "VectorCache", "chunked_ranks", "confusion_matrix", "encode_cached", "evaluate_patchdis",
    "evaluate_retrieval", "load_retrieval_set", "load_segmentation_set", "ranks_from_scores", "recall_from_ranks",
    "segmentation_scores", "sparsity_analysis",
]
