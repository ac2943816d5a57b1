"""The shared lexical vocabulary: which LLM tokens are real words, and dimension <-> word maps.

The filter is deterministic and documented in ``docs/architecture.md``:

1. drop the tokenizer's special and added tokens;
2. keep word-initial tokens only (SentencePiece ``▁`` or byte-level BPE ``Ġ`` prefix), so sub-word
   continuations ("ing", "tion") never become dimensions;
3. the surface form must be ASCII letters only, at least ``min_chars`` long (drops punctuation,
   numbers, emoji, byte tokens and one-letter tokens);
4. word shape (``shape_rules``): a two-letter word must be one of the closed class of common English
   two-letter words (:data:`TWO_LETTER_WORDS`; drops "ge", "ze", "th", "st"); a longer one needs a vowel
   (a, e, i, o, u, y) and no letter three times in a row (drops "rr", "aaa", "www");
5. the lower-cased form must be an English word with Zipf frequency >= ``min_zipf`` in ``wordfreq``'s
   list (drops word-initial fragments such as "strugg", "authent" that BPE merges leave behind);
6. fragments that pass 5 because web text is full of broken words: a word rarer than ``fragment_zipf``
   is dropped when the words that *start with it* are together ``fragment_ratio`` times more frequent
   than it is ("includ" -> including, "physic" -> physical, "tri", "cir", "fou"). Common short words
   ("bee" -> been, "ear" -> early) are above ``fragment_zipf`` and stay;
7. function words (``function_words``, off by default): the closed classes of English (articles and
   determiners, pronouns, prepositions, conjunctions, auxiliary and modal verbs, a few degree adverbs:
   :data:`FUNCTION_WORDS`) are not dimensions, as stop words are not terms in lexical retrieval. Our
   choice, not the paper's; numbers, colours and content words stay;
8. case duplicates are merged into one lower-cased word; its token is the lower-case one when the
   tokenizer has it, else the most frequent cased variant (lowest token id).

The vocabulary is stored with every checkpoint, so a model never depends on the word list's version
after training.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WORD_PREFIXES = ("Ġ", "▁")
_LETTERS = re.compile(r"^[A-Za-z]+$")
_VOWEL = re.compile(r"[aeiouy]")
_TRIPLE = re.compile(r"(.)\1\1")
# The common English two-letter words. Any other two-letter token is an abbreviation or a BPE piece
# ("ge", "ze", "th", "st", "pe"): a closed class is easier to read than a frequency cut-off here.
TWO_LETTER_WORDS = frozenset({
    "ad", "ah", "am", "an", "as", "at", "aw", "ax", "be", "by", "do", "eh", "go", "ha", "he", "hi", "ho",
    "id", "if", "in", "is", "it", "ma", "me", "my", "no", "of", "oh", "ok", "on", "or", "ow", "ox", "pa",
    "pi", "so", "to", "tv", "uh", "um", "up", "us", "we", "ye", "yo"
})


# English function words (closed classes), for ``VocabularyFilter.function_words``. A hand-kept list, not
# a stop-word package: the packaged English lists (e.g. stop-words' 1,333 entries) also hold content
# words an image can show ("face", "fire", "computer", "home", "four"). Directions ("up", "down", "over",
# "out", "behind") and "one" are kept: they name things in pictures (arrows, "thumbs up").
_FUNCTION_WORDS = """
a an the this that these those some any no every each either neither all both half such what which
whose whatever whichever another other others
i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its
itself we us our ours ourselves they them their theirs themselves oneself
someone somebody something anyone anybody anything everyone everybody everything nobody nothing none
who whom whoever
about across after against along amid among around as at before beneath beside besides between beyond
by despite during except for from in into like of on onto past per since than through throughout till to
toward towards unlike until upon via with within without
and but or nor so yet because although though while whereas if unless whether then
am is are was were be been being have has had having do does did doing done will would shall should
can could may might must ought
not very too also just only quite rather really even ever still there here where when why how
"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())


@dataclass(frozen=True)
class VocabularyFilter:
    """Settings of the token -> word filter (see module docstring)."""

    min_chars: int = 2
    min_zipf: float = 2.0  # wordfreq Zipf scale: 2.0 = once per 1M words
    dictionary: str = "wordfreq"  # "wordfreq" or "none" (letters-only filter, for tests/offline oddities)
    shape_rules: bool = True  # two-letter allow-list; a vowel and no triple letter in longer words
    # Rule 6 (wordfreq only): words rarer than this Zipf value are tested for being fragments ...
    fragment_zipf: float = 4.0
    # ... and dropped when the words that extend them are this many times more frequent (0 = off).
    # Measured on SmolLM2 (docs/architecture.md): 4.0 / 50 drops "tri", "cir", "includ", "physic" and
    # keeps "bee", "ant", "hen", "owl"; it loses "pea" and "fin".
    fragment_ratio: float = 50.0
    # Rule 7: drop FUNCTION_WORDS (stop words) from the dimensions.
    function_words: bool = False

    def __post_init__(self) -> None:
        if self.dictionary not in ("wordfreq", "none"):
            raise ValueError(f"dictionary must be 'wordfreq' or 'none', got {self.dictionary!r}")
        if self.min_chars < 1:
            raise ValueError("min_chars must be >= 1")
        if self.fragment_ratio < 0:
            raise ValueError("fragment_ratio must be >= 0 (0 turns the fragment rule off)")


@dataclass
class Vocabulary:
    """Lexical dimensions: ``words[j]`` is dimension j's word, ``token_ids[j]`` its LLM token."""

    words: list[str]
    token_ids: list[int]
    source: str = ""  # tokenizer it was derived from, informational
    filter: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.words) != len(self.token_ids):
            raise ValueError("words and token_ids must have the same length")
        if len(set(self.words)) != len(self.words):
            raise ValueError("vocabulary words must be unique")
        self._index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word.lower() in self._index

    def index(self, word: str) -> int:
        """Dimension of ``word`` (case-insensitive); KeyError with a hint when it is not a dimension."""
        try:
            return self._index[word.lower()]
        except KeyError:
            raise KeyError(f"'{word}' is not in the lexical vocabulary ({len(self)} words)") from None

    def lookup(self, dims: Iterable[int]) -> list[str]:
        return [self.words[int(d)] for d in dims]

    def fingerprint(self) -> str:
        """Short stable hash; indexes and caches record it to refuse vectors from another vocabulary."""
        import hashlib

        h = hashlib.sha256("\n".join(f"{w}\t{t}" for w, t in zip(self.words, self.token_ids)).encode())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"words": self.words, "token_ids": self.token_ids, "source": self.source, "filter": self.filter}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        return cls(list(data["words"]), [int(t) for t in data["token_ids"]], data.get("source", ""),
                   dict(data.get("filter", {})))

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _surface(token: str) -> str | None:
    """Word-initial token -> its letters, or None for anything else."""
    if not token.startswith(WORD_PREFIXES):
        return None
    return token[1:]


def _shape_ok(word: str) -> bool:
    if len(word) < 2:
        return True  # one-letter tokens are governed by min_chars alone
    if len(word) == 2:
        return word in TWO_LETTER_WORDS
    return bool(_VOWEL.search(word)) and not _TRIPLE.search(word)


@functools.cache
def _english_prefix_index() -> tuple[list[str], np.ndarray, dict[str, float]]:
    """wordfreq's English words (letters only) sorted, the running sum of their frequencies, and the
    frequencies themselves: the mass of all words starting with ``w`` is one bisect away."""
    from wordfreq import get_frequency_dict

    freqs = {w: f for w, f in get_frequency_dict("en").items() if w.isascii() and w.isalpha()}
    words = sorted(freqs)
    cumulative = np.concatenate([[0.0], np.cumsum([freqs[w] for w in words])])
    return words, cumulative, freqs


def is_fragment(word: str, max_zipf: float = 4.0, ratio: float = 50.0) -> bool:
    """Rule 6: a rare word (Zipf < ``max_zipf``) whose extensions are ``ratio`` times more frequent."""
    from wordfreq import zipf_frequency

    if ratio <= 0 or zipf_frequency(word, "en") >= max_zipf:
        return False
    words, cumulative, freqs = _english_prefix_index()
    lo = bisect.bisect_right(words, word)  # first word after `word` itself
    hi = bisect.bisect_left(words, word + "{")  # "{" sorts after "z": end of the words starting with it
    extensions = float(cumulative[hi] - cumulative[lo])
    own = freqs.get(word, 0.0)
    return extensions >= ratio * own if own > 0 else extensions > 0


def build_vocabulary(tokenizer, vfilter: VocabularyFilter | None = None, source: str = "") -> Vocabulary:
    """Derive the lexical vocabulary from a Hugging Face tokenizer (see module docstring)."""
    vfilter = vfilter or VocabularyFilter()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    zipf = None
    if vfilter.dictionary == "wordfreq":
        from wordfreq import zipf_frequency

        zipf = zipf_frequency

    candidates: dict[str, list[tuple[str, int]]] = {}
    for token, tid in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if tid in special:
            continue
        surface = _surface(token)
        if surface is None or len(surface) < vfilter.min_chars or not _LETTERS.match(surface):
            continue
        if vfilter.shape_rules and not _shape_ok(surface.lower()):
            continue
        if vfilter.function_words and surface.lower() in FUNCTION_WORDS:
            continue
        candidates.setdefault(surface.lower(), []).append((surface, tid))

    words, ids = [], []
    for word, variants in candidates.items():
        if zipf is not None and (zipf(word, "en") < vfilter.min_zipf
                                 or is_fragment(word, vfilter.fragment_zipf, vfilter.fragment_ratio)):
            continue
        exact = [tid for s, tid in variants if s == word]
        ids.append(exact[0] if exact else min(tid for _, tid in variants))
        words.append(word)
    order = np.argsort(ids, kind="stable")  # dimensions in token-id order: deterministic, readable
    return Vocabulary(
        [words[i] for i in order],
        [ids[i] for i in order],
        source=source,
        filter=dataclasses.asdict(vfilter),
    )


def check_vocabulary(vocab: Vocabulary, num_embeddings: int) -> None:
    """Every token id must index the LLM's output head."""
    bad: Sequence[int] = [t for t in vocab.token_ids if not 0 <= t < num_embeddings]
    if bad:
        raise ValueError(f"vocabulary has {len(bad)} token ids outside the LLM's {num_embeddings} rows: {bad[:5]}")
