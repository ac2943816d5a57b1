"""Data for LexVLA: emoji (three styles, CLDR names), the easy-vqa toy set, image-text pair sources, feature caches and loaders."""

from lexvla.data.cache import (
    ArrayStore,
    BuildResult,
    CachedPair,
    CachedPairDataset,
    CacheKey,
    TextVectorCache,
    build_cache,
    build_feature_cache,
)
from lexvla.data.easyvqa import (
    COLOURS,
    SHAPES,
    EasyVQAConfig,
    EasyVQADataset,
    EasyVQARecord,
    analyse_shape_pixels,
    load_easyvqa,
    write_masks,
)
from lexvla.data.emoji import EmojiConfig, EmojiDataset, fetch_emoji, load_emoji
from lexvla.data.loader import Batch, EpochSampler, PairCollator, build_dataloader
from lexvla.data.records import read_manifest, write_manifest
from lexvla.data.sources import (
    FirstPairs,
    HFDatasetSource,
    ImageLoadError,
    ManifestSource,
    Pair,
    PairRecord,
    Skipped,
    SkipStats,
    TarShardSource,
    decode_image,
    expand_shards,
)

__all__ = [
    "COLOURS", "SHAPES", "ArrayStore", "Batch", "BuildResult", "CacheKey", "CachedPair", "CachedPairDataset",
    "EasyVQAConfig", "EasyVQADataset", "EasyVQARecord", "EpochSampler", "FirstPairs", "HFDatasetSource", "ImageLoadError",
    "ManifestSource", "Pair", "PairCollator", "PairRecord", "SkipStats", "Skipped", "TarShardSource",
    "TextVectorCache", "analyse_shape_pixels", "build_cache", "build_dataloader", "build_feature_cache",
    "decode_image", "expand_shards", "load_easyvqa", "write_masks",
    "EmojiConfig", "EmojiDataset", "fetch_emoji", "load_emoji", "read_manifest", "write_manifest",
]
