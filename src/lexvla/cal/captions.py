"""Multi-token captions of concepts (an emoji's name + keywords) and caption-noise injection.

A caption is a fixed template over *slots*: ``"{name}: {keyword}, {keyword}"``. The slot values are the
concept's words (object, colour, keywords); the template text (``": "``, ``", "``) and the function words
inside a name ("with", "of") are predictable from the text alone. Noise injection (fluent, the default)
replaces, in a seeded share of the captions, every slot by the same slot of one other concept: the template
stays and the caption reads as a normal caption of the other concept ("wolf: animal, face" for a ship's
image), so the text alone cannot tell it is wrong, only the image can. ``slots_replaced=k`` replaces only
the first k slots instead (a caption that mixes two concepts, detectable from the text). Every caption
knows the character span of each word and whether it is a content word and whether it was injected, so
the per-token evaluation can label tokens exactly.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lexvla.cal.data import noisy_positions

# Function words: never scored as content. Short on purpose; CLDR names use few of them.
FUNCTION_WORDS = frozenset(
    ["a", "an", "the", "of", "with", "and", "or", "in", "on", "at", "for", "to", "from", "by", "as", "is", "are", "be", "this", "that", "it", "its", "into", "over", "under", "up", "down", "off", "out", "no", "not", "without"]
)
_WORD = re.compile(r"[^\W_](?:[\w'’.-]*[^\W_])?", re.UNICODE)  # letters/digits, inner ' - . kept


def is_content_word(word: str) -> bool:
    """A content word has a letter and is not a function word."""
    return any(ch.isalpha() for ch in word) and word.lower() not in FUNCTION_WORDS


@dataclass(frozen=True)
class Concept:
    """One concept: its name (e.g. "red apple"), keywords (not repeating the name's words) and images."""

    name: str
    keywords: tuple[str, ...]
    images: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("Concept.name must not be empty")
        object.__setattr__(self, "keywords", tuple(self.keywords))
        object.__setattr__(self, "images", tuple(self.images))


@dataclass(frozen=True)
class Word:
    """One word of a caption: characters ``[start, end)`` of :attr:`CaptionExample.text`."""

    start: int
    end: int
    text: str
    content: bool
    injected: bool


@dataclass(frozen=True)
class CaptionExample:
    """A caption of ``concept`` for ``image``; ``slots`` are the caption's slot values (name first),
    ``injected`` flags the slots replaced by another concept's (``source``)."""

    image: str
    concept: str
    slots: tuple[str, ...]
    injected: tuple[bool, ...] = ()
    source: str | None = None  # the concept the injected slots came from
    clean_slots: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.slots:
            raise ValueError("a caption needs at least the name slot")
        if not self.injected:
            object.__setattr__(self, "injected", (False,) * len(self.slots))
        if not self.clean_slots:
            object.__setattr__(self, "clean_slots", self.slots)
        if not len(self.injected) == len(self.slots) == len(self.clean_slots):
            raise ValueError("slots, injected and clean_slots must have the same length")

    @property
    def noisy(self) -> bool:
        return any(self.injected)

    @property
    def text(self) -> str:
        return render_caption(self.slots)

    @property
    def clean_text(self) -> str:
        return render_caption(self.clean_slots)

    def words(self) -> list[Word]:
        """Every word of :attr:`text` with its span, content flag and injected flag."""
        out: list[Word] = []
        pos = 0
        for i, (value, inj) in enumerate(zip(self.slots, self.injected, strict=True)):
            pos += len(_separator(i))
            for m in _WORD.finditer(value):
                w = m.group(0)
                out.append(Word(pos + m.start(), pos + m.end(), w, is_content_word(w), inj))
            pos += len(value)
        return out

    def to_vlm_example(self):
        """The training record (:class:`lexvla.cal.data.VLMExample`, a caption example)."""
        from lexvla.cal.data import VLMExample

        return VLMExample(self.image, self.text, None, self.clean_text if self.noisy else None)


def _separator(i: int) -> str:
    return "" if i == 0 else (": " if i == 1 else ", ")


def render_caption(slots: Sequence[str]) -> str:
    """``"name: kw1, kw2"`` (the template that every caption and every injection keeps)."""
    return "".join(_separator(i) + s for i, s in enumerate(slots))


def caption_slots(concept: Concept, keywords: int = 2) -> tuple[str, ...]:
    """Name + the first ``keywords`` keywords that are plain words (letters only, 3+, not function words)
    and do not repeat the name's words."""
    name_words = {w.lower() for w in _WORD.findall(concept.name)}
    kws = [k for k in (k.strip() for k in concept.keywords)
           if k.isalpha() and len(k) >= 3 and is_content_word(k) and k.lower() not in name_words]
    return (concept.name.strip(), *[k.strip() for k in kws[:keywords]])


def inject_caption_noise(captions: Sequence[CaptionExample], rate: float, concepts: Sequence[Concept],
                         seed: int = 0, slots_replaced: int | None = None, keywords: int = 2) -> list[CaptionExample]:
    """Replace, in exactly ``round(rate * len(captions))`` seeded captions, the slots by the same slots of
    another, seeded concept that shares no content word with the caption. ``slots_replaced`` None (fluent
    noise): every slot, so the caption becomes the other concept's own caption, fluent but wrong for the
    image (the replacement concept then has as many slots); k: only the first k slots (name, then
    keywords), the other slots stay. Template text always stays. Captions chosen at a rate are among
    those chosen at any higher rate (one seed), and a caption's replacement does not depend on the rate."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"caption noise rate must be in [0, 1], got {rate}")
    if slots_replaced is not None and slots_replaced < 1:
        raise ValueError(f"slots_replaced must be >= 1 or None (every slot), got {slots_replaced}")
    by_name = {c.name: c for c in concepts}
    if len(by_name) < 2:
        raise ValueError("caption noise needs at least two concepts to draw replacements from")
    names = sorted(by_name)
    chosen, draws = noisy_positions(len(captions), rate, seed)
    out = []
    for i, cap in enumerate(captions):
        if i not in chosen:
            out.append(cap)
            continue
        others = [n for n in names if n != cap.concept and _words_disjoint(by_name[n], cap)
                  and (slots_replaced is not None or len(caption_slots(by_name[n], keywords)) == len(cap.slots))]
        if not others:
            raise ValueError(f"no concept shares no word with {cap.concept!r}"
                             f"{'' if slots_replaced else ' and has as many slots'}: cannot inject noise into it")
        src = by_name[others[int(draws[i] * len(others))]]
        src_slots = caption_slots(src, keywords)
        slots, injected = list(cap.slots), list(cap.injected)
        n_replace = len(slots) if slots_replaced is None else slots_replaced
        for j in range(min(n_replace, len(slots), len(src_slots))):
            slots[j], injected[j] = src_slots[j], True
        out.append(CaptionExample(cap.image, cap.concept, tuple(slots), tuple(injected), src.name, cap.clean_slots))
    return out


def _words_disjoint(other: Concept, cap: CaptionExample) -> bool:
    """An injected word must really contradict the image: the source concept shares no content word with
    the caption (no "cat face" for "cat")."""
    mine = {w.text.lower() for w in cap.words() if w.content}
    theirs = {w.lower() for s in caption_slots(other) for w in _WORD.findall(s) if is_content_word(w)}
    return not (mine & theirs)


def text_words(text: str) -> list[Word]:
    """Words of any text (no injection flags): what ``lexvla cal inspect`` scores for free captions."""
    return [Word(m.start(), m.end(), m.group(0), is_content_word(m.group(0)), False) for m in _WORD.finditer(text)]


def token_words(tokenizer, text: str, words: Sequence[Word] | None = None) -> tuple[list[int], list[int | None]]:
    """Token ids of ``text`` as the VLM tokenises a target (``" " + text``, no EOS) and, per token, the
    index in ``words`` (default :func:`text_words`; spans relative to ``text``) of the word it overlaps,
    or None (separators)."""
    from lexvla.cal.data import format_target

    words = text_words(text) if words is None else words
    target = format_target(text)
    shift = target.index(text.strip()) if text.strip() else 0
    enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    out: list[int | None] = []
    for s, e in enc["offset_mapping"]:
        s, e = s - shift, e - shift
        out.append(next((k for k, w in enumerate(words) if s < w.end and e > w.start), None))
    return list(enc["input_ids"]), out


# ------------------------------------------------------------------------------------------ concepts
def read_concepts(path: str | Path) -> list[Concept]:
    """JSONL ``{"name": ..., "keywords": [...], "image": path | "images": [paths]}`` per line (paths
    relative to the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"concept file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
        images = row.get("images") or ([row["image"]] if "image" in row else [])
        if "name" not in row or not images:
            raise ValueError(f"{path}:{n}: a concept needs 'name' and 'image' (or 'images')")
        keywords = row.get("keywords", [])
        if isinstance(keywords, str):
            keywords = [k.strip() for k in keywords.split(",")]
        resolved = [str(p if Path(p).is_absolute() else path.parent / p) for p in images]
        out.append(Concept(str(row["name"]), tuple(str(k) for k in keywords), tuple(resolved)))
    if not out:
        raise ValueError(f"concept file {path} has no concepts")
    return out


def select_concepts(concepts: Sequence[Concept], n: int, seed: int = 0, keywords: int = 2) -> list[Concept]:
    """A seeded subset of ``n`` concepts with distinct names, ``keywords`` usable keywords each and short
    names (at most 4 words, no template separators), so every caption has the full template."""
    usable = {}
    for c in concepts:
        if (len(caption_slots(c, keywords)) == keywords + 1 and len(c.name.split()) <= 4 and c.images
                and not set(c.name) & set(":,")):  # the template's separators
            usable.setdefault(c.name.lower(), c)
    pool = sorted(usable.values(), key=lambda c: c.name)
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} concepts have a short name and {keywords} keywords; asked for {n}")
    return random.Random(seed).sample(pool, n)


# --------------------------------------------------------------------------------------------- images
def render_view(source: str | Path, seed: int, size: int = 64):
    """One augmented view of a concept's image: scaled 60-95%, shifted, flattened onto a random light
    background (emoji have transparency). Held-out views use other seeds, so test images are new images
    of known concepts."""
    from PIL import Image

    rng = random.Random(seed)
    img = Image.open(source)
    img.load()
    img = img.convert("RGBA")
    scale = rng.uniform(0.6, 0.95)
    side = max(8, round(size * scale))
    img = img.resize((side, side), Image.BICUBIC)
    bg = tuple(rng.randint(200, 255) for _ in range(3)) + (255,)
    canvas = Image.new("RGBA", (size, size), bg)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    canvas.alpha_composite(img, (x, y))
    return canvas.convert("RGB")


def materialise_views(concepts: Sequence[Concept], views: int, folder: str | Path, seed: int,
                      size: int = 64) -> dict[str, list[str]]:
    """Write ``views`` augmented PNGs per concept (cycling through its images) under ``folder``; returns
    name -> paths. File names encode concept index, seed and view, so reruns reuse them."""
    from lexvla.io import atomic_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = {}
    for ci, c in enumerate(concepts):
        paths = []
        for v in range(views):
            src = c.images[v % len(c.images)]
            file = folder / f"{_slug(c.name)}-s{seed}-v{v}.png"
            if not file.is_file():
                img = render_view(src, seed=seed * 1_000_003 + ci * 1_009 + v, size=size)
                with atomic_path(file) as tmp:
                    img.save(tmp, format="PNG")
            paths.append(str(file))
        out[c.name] = paths
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "concept"


def write_fixture_concepts(folder: str | Path, n: int = 8, size: int = 48) -> Path:
    """A tiny generated concept set (coloured shapes on transparency, names + keywords) in the shape of the
    emoji data: ``folder/concepts.jsonl`` + PNGs. For tests and dry runs."""
    from PIL import Image, ImageDraw

    colours = [("red", (220, 30, 30)), ("blue", (30, 60, 220)), ("green", (30, 170, 60)), ("yellow", (235, 200, 20)),
               ("purple", (140, 40, 170)), ("orange", (245, 130, 20)), ("black", (20, 20, 20)), ("pink", (240, 120, 180))]
    shapes = [("circle", ("round", "ring")), ("square", ("box", "block")), ("triangle", ("peak", "wedge")),
              ("star", ("night", "sparkle")), ("cross", ("plus", "mark"))]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        cname, rgb = colours[i % len(colours)]
        sname, kws = shapes[(i * 3 + i // len(colours)) % len(shapes)]
        img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        d = ImageDraw.Draw(img)
        m = size // 8
        box = (m, m, size - m, size - m)
        if sname == "circle":
            d.ellipse(box, fill=rgb + (255,))
        elif sname == "square":
            d.rectangle(box, fill=rgb + (255,))
        elif sname == "triangle":
            d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=rgb + (255,))
        elif sname == "star":
            d.polygon([(size // 2, m), (size * 5 // 8, size * 3 // 8), (size - m, size * 3 // 8), (size * 11 // 16, size * 5 // 8),
                       (size * 3 // 4, size - m), (size // 2, size * 3 // 4), (size // 4, size - m),
                       (size * 5 // 16, size * 5 // 8), (m, size * 3 // 8), (size * 3 // 8, size * 3 // 8)], fill=rgb + (255,))
        else:
            w = size // 6
            d.rectangle((size // 2 - w, m, size // 2 + w, size - m), fill=rgb + (255,))
            d.rectangle((m, size // 2 - w, size - m, size // 2 + w), fill=rgb + (255,))
        file = folder / f"c{i}.png"
        img.save(file)
        rows.append({"name": f"{cname} {sname}", "keywords": [cname, kws[0], kws[1], f"{kws[0]}{i}"],
                     "image": file.name})
    path = folder / "concepts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
