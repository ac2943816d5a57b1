"""Explain one image: its words, its patches' words and, for given texts, which patches they light up.

:func:`explain_image` computes everything (numbers only); :func:`render_explanation` writes the PNGs,
a JSON file and an HTML page. The web app reuses the same pieces.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..preprocess import ImageInput, load_image
from .html import HtmlSection, paragraph, words_table, write_html_page
from .patches import patch_top_words, patch_words_figure, text_heatmap, text_patch_scores
from .wordcloud import word_cloud

logger = logging.getLogger(__name__)


@dataclass
class TextMatch:
    """How one text relates to the image."""

    text: str
    score: float  # image . text of the sparsified lexical vectors
    shared_words: list[tuple[str, float]]  # (word, image weight x text weight), largest first; sums to score
    text_words: list[tuple[str, float]]  # the text's own top words
    patch_scores: np.ndarray  # (rows, cols): each patch's lexical vector . the text's vector


@dataclass
class ImageExplanation:
    """Everything :func:`render_explanation` draws, as plain numbers and words."""

    source: str  # file name or "<image>"
    model: str
    image: Image.Image
    words: list[tuple[str, float]]  # top words of the sparsified image vector
    active_words: int
    patch_words: list[list[tuple[str, float]]]  # per patch (row-major), top words
    grid: tuple[int, int]
    texts: list[TextMatch] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able view (no pixels)."""
        return {
            "source": self.source, "model": self.model, "active_words": self.active_words,
            "words": [[w, s] for w, s in self.words], "grid": list(self.grid),
            "patch_words": [[[w, s] for w, s in pw] for pw in self.patch_words],
            "texts": [{"text": t.text, "score": t.score, "shared_words": [[w, s] for w, s in t.shared_words],
                       "text_words": [[w, s] for w, s in t.text_words],
                       "patch_scores": t.patch_scores.round(6).tolist()} for t in self.texts],
        }


def shared_words(a: torch.Tensor, b: torch.Tensor, words: Sequence[str]) -> list[tuple[str, float]]:
    """Words active in both (V,) vectors with their contribution a[j] * b[j], largest first.

    The contributions sum to the dot product ``a . b`` (up to float rounding).
    """
    prod = a.detach().double().cpu().numpy() * b.detach().double().cpu().numpy()
    nz = np.flatnonzero(prod > 0)
    order = nz[np.lexsort((nz, -prod[nz]))]  # largest first, ties by dimension
    return [(words[int(j)], float(prod[j])) for j in order]


@torch.no_grad()
def explain_image(model, image: ImageInput, texts: Sequence[str] = (), *, top_words: int = 60,
                  patch_k: int = 3, model_name: str = "") -> ImageExplanation:
    """Encode ``image`` (path or PIL) with ``model`` and explain it, and its match with each text.

    Image and text vectors are sparsified with the model's default threshold (what an index stores);
    patch vectors stay dense so every patch gets a score.
    """
    source = str(image) if isinstance(image, (str, Path)) else "<image>"
    pil = load_image(image)
    out = model.encode_image([pil], return_patches=True)
    sparse = model.sparsify(out)
    words = model.top_words(sparse, top_words)[0]
    expl = ImageExplanation(source=source, model=model_name or getattr(model.config, "name", "") or "",
                            image=pil, words=words, active_words=int(sparse.active_words()[0]),
                            patch_words=patch_top_words(model, out, 0, patch_k), grid=tuple(out.grid))
    texts = [t for t in texts if t.strip()]
    if texts:
        tout = model.sparsify(model.encode_text(list(texts)))
        for i, text in enumerate(texts):
            pairs = shared_words(sparse.vectors[0], tout.vectors[i], model.vocab.words)
            expl.texts.append(TextMatch(
                text=text, score=float(sparse.vectors[0].double() @ tout.vectors[i].double()),
                shared_words=pairs, text_words=model.top_words(tout.vectors[i:i + 1], 15)[0],
                patch_scores=text_patch_scores(out, tout, 0, i)))
    return expl


@dataclass
class ExplainFiles:
    """Files written by :func:`render_explanation`."""

    html: Path
    json: Path
    image: Path
    word_cloud: Path
    patch_words: Path
    heatmaps: list[Path] = field(default_factory=list)


def render_explanation(expl: ImageExplanation, out_dir: str | Path, words_per_patch: int = 1) -> ExplainFiles:
    """Write ``input.png``, ``wordcloud.png``, ``patches.png``, ``heatmap-N.png``, ``explain.json`` and
    ``index.html`` (linking them) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(expl.source).name if expl.source != "<image>" else "image"
    files = ExplainFiles(html=out / "index.html", json=out / "explain.json", image=out / "input.png",
                         word_cloud=out / "wordcloud.png", patch_words=out / "patches.png")
    expl.image.save(files.image)
    word_cloud(expl.words, files.word_cloud, title=f"{name}: {expl.active_words} active words")
    rows, cols = expl.grid
    patch_words_figure(expl.image, expl.patch_words, expl.grid, files.patch_words,
                       words_per_patch=words_per_patch, title=f"top word of each patch ({rows}x{cols})")
    sections = [
        HtmlSection("Image", files.image.name),
        HtmlSection("Word cloud of the image's lexical vector", files.word_cloud.name,
                    words_table([(w, s) for w, s in expl.words[:20]], ["word", "weight"])),
        HtmlSection("Top words of each patch", files.patch_words.name,
                    paragraph("Cells are tinted by their top word; patches sharing a word share a colour.", "note")),
    ]
    for i, t in enumerate(expl.texts):
        path = out / f"heatmap-{i}.png"
        text_heatmap(expl.image, t.patch_scores, path, text=t.text)
        files.heatmaps.append(path)
        body = paragraph(f"image · text score {t.score:.4f} = sum of {len(t.shared_words)} shared words' "
                         "contributions (image weight x text weight):")
        body += words_table([(w, s) for w, s in t.shared_words[:15]], ["shared word", "contribution"])
        body += paragraph("The text's own top words: " + ", ".join(w for w, _ in t.text_words), "note")
        sections.append(HtmlSection(f"Which patches “{t.text}” lights up", path.name, body))
    files.json.write_text(json.dumps(expl.to_dict(), indent=1), encoding="utf-8")
    write_html_page(files.html, f"lexvla explain: {name}", sections,
                    intro=f"model {expl.model}; grid {rows}x{cols}; {expl.active_words} active words")
    logger.info("wrote %s", files.html)
    return files
