"""Figures of a training report (``lexvla demo`` draws its page from these): training curves, word clouds
of images, the words captions activate, the patches a word lights up, over-used words before/after."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import new_figure, save_figure


def curves_figure(metrics: Sequence[dict[str, Any]], path: str | Path) -> bool:
    """Loss, active words per image / caption and temperature against the step (False: no metrics)."""
    if not metrics:
        return False
    steps = [m["step"] for m in metrics if "loss" in m]
    rows = [m for m in metrics if "loss" in m]
    panels = [("loss", "training loss"), ("words/image", "active words (> 1/sqrt(V))"), ("temperature", "temperature")]
    fig = new_figure(12, 3.4)
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if key == "words/image":
            ax.plot(steps, [m.get("words/image", math.nan) for m in rows], label="image")
            ax.plot(steps, [m.get("words/text", math.nan) for m in rows], label="caption")
            ax.set_yscale("log")
            ax.legend()
        else:
            ax.plot(steps, [m.get(key, math.nan) for m in rows])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def clouds_figure(words: Sequence[Sequence[tuple[str, float]]], images: Sequence[Any], titles: Sequence[str],
                  path: str | Path) -> Path:
    """One row per image: the picture and the word cloud of its lexical vector."""
    from .wordcloud import WordCloudConfig, draw_word_cloud

    n = len(images)
    fig = new_figure(10, 2.6 * n)
    for row in range(n):
        ax = fig.add_axes((0.01, 1 - (row + 1) / n + 0.02 / n, 0.22, 0.9 / n))
        ax.imshow(images[row])
        ax.set_axis_off()
        ax.set_title(titles[row], fontsize=10)
        ax2 = fig.add_axes((0.26, 1 - (row + 1) / n + 0.02 / n, 0.73, 0.9 / n))
        draw_word_cloud(ax2, list(words[row]), WordCloudConfig(width=700, height=220, max_words=40))
        ax2.set_axis_off()
    save_figure(fig, path)
    return Path(path)


def caption_words_figure(captions: Sequence[str], words: Sequence[Sequence[tuple[str, float]]],
                         path: str | Path) -> Path:
    """Bar charts of each caption's top words."""
    n = len(captions)
    fig = new_figure(10, 2.2 * math.ceil(n / 2))
    for i, (cap, ws) in enumerate(zip(captions, words)):
        ax = fig.add_subplot(math.ceil(n / 2), 2, i + 1)
        ax.barh([w for w, _ in ws][::-1], [v for _, v in ws][::-1], color="#4a7ebb")
        ax.set_title(f"“{cap}”", fontsize=10)
        ax.tick_params(labelsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)


def word_patches_figure(images: Sequence[Any], maps: Sequence[Sequence[tuple[str, np.ndarray]]],
                        path: str | Path, row_titles: Sequence[str] | None = None) -> Path:
    """One row per image: the picture, then one heat map per (title, patch score grid)."""
    from .patches import draw_text_heatmap

    n = len(images)
    cols = 1 + max(len(m) for m in maps)
    fig = new_figure(3 * cols, 3.1 * n)
    for row in range(n):
        ax = fig.add_subplot(n, cols, row * cols + 1)
        ax.imshow(images[row])
        ax.set_axis_off()
        ax.set_title(row_titles[row] if row_titles else "image", fontsize=10)
        for j, (title, scores) in enumerate(maps[row]):
            ax = fig.add_subplot(n, cols, row * cols + 2 + j)
            draw_text_heatmap(ax, images[row], np.asarray(scores, dtype=np.float32), title=title)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)


def overuse_figure(before: Sequence[tuple[str, float]], after: Sequence[tuple[str, float]], path: str | Path,
                   target: float = 0.2) -> Path:
    """Share of test captions in which a word fires without being in the caption, before and after."""
    fig = new_figure(10, 3.6)
    for i, (title, rows) in enumerate((("before training (untrained text side)", before), ("after training", after))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.barh([w for w, _ in rows][::-1], [100 * s for _, s in rows][::-1], color="#c0504d" if i == 0 else "#4a7ebb")
        ax.axvline(100 * target, color="k", ls="--", lw=1)
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of test captions (word not in the caption)")
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)


def patch_grid(patch_vectors: torch.Tensor, grid: tuple[int, int], column: torch.Tensor | int) -> np.ndarray:
    """(P, V) patch vectors -> (rows, cols) weight of one word index, or dot product with a query vector."""
    scores = patch_vectors[:, column] if isinstance(column, int) else patch_vectors.float() @ column.float()
    return scores.float().reshape(grid).cpu().numpy()


# ------------------------------------------------------------------------------------- the demo's page
def _fmt(x: Any) -> str:
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def write_demo_report(out_dir: str | Path, cfg: Any, model: Any, dense: Any, data: Any, enc: Any, seg: Any,
                      preset: Any, result: Any, metrics: Sequence[dict[str, Any]]) -> Path:
    """The ``lexvla demo`` page: comparison tables, R@1 vs active words, PatchDis, over-used words,
    word clouds, caption words, patch words and word heat maps on collages, training curves."""
    from ..data import decode_image
    from ..outputs import LexicalOutput
    from .html import HtmlSection, paragraph, words_table, write_html_page
    from .patches import patch_top_words, patch_words_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[HtmlSection] = []
    th = 1.0 / math.sqrt(len(model.vocab))

    rows = []
    for label, kinds in result.retrieval.items():
        for kind, m in kinds.items():
            rows.append([label, kind, m["i2t"]["R@1"], m["i2t"]["R@5"], m["t2i"]["R@1"], m["t2i"]["R@5"],
                         f"{m['words']['image']:.0f} / {m['words']['text']:.0f}", f"{m['images']} / {m['texts']}"])
    body = words_table(rows, ["held-out set", "model", "I→T R@1", "I→T R@5", "T→I R@1", "T→I R@5",
                              "active words img / caption", "images / texts"])
    body += paragraph(f"LexVLA vectors sparsified at 1/sqrt(V) = {th:.5f} (the paper's threshold); the dense "
                      f"baseline uses its whole {model.text.hidden_size}-dim embedding. Texts: one per concept (emoji: "
                      "\u201can emoji of <name>\u201d); a match = same concept. Ties counted against the model.", "note")
    sections.append(HtmlSection("Zero-shot retrieval: LexVLA vs the dense baseline", body=body))

    dense_r1 = None
    if "dense" in next(iter(result.retrieval.values())):
        d = next(iter(result.retrieval.values()))["dense"]
        dense_r1 = (d["i2t"]["R@1"], d["t2i"]["R@1"])
    from ..demo import _curve

    _curve(enc, data, out / "recall_vs_words.png", dense_r1)
    sections.append(HtmlSection("R@1 vs active words (held-out concepts)", "recall_vs_words.png",
                                paragraph("The same trained vectors cut to fewer words (threshold multiples of "
                                          "1/sqrt(V) and top-k per vector).", "note")))

    if result.patchdis:
        pd = result.patchdis
        body = words_table([[label, _fmt(pd.get(key)), _fmt(pd.get(f"{key}_localisation_auc")),
                             _fmt(pd.get(f"{key}_present"))]
                            for label, key in (("LexVLA (words)", "lexvla"),
                                               ("dense baseline (patch similarity)", "dense"))],
                           ["model", "PatchDis mIoU (all test concepts)", "localisation AUC",
                            "mIoU (concepts present in the collage)"])
        grid = pd.get("grid")
        body += paragraph(f"{len(seg.samples)} held-out collages"
                          + (f", encoded at {pd['image_size']} px ({grid[0]}x{grid[1]} patches)"
                             if pd.get("image_size") and grid else "")
                          + f"; each patch takes the class whose prompt \u201c{preset.prompt}\u201d scores highest "
                          f"against the patch's vector, among all {len(seg.class_names) - 1} test concepts (the "
                          "paper's protocol) or, second number, among the 2-4 concepts in the collage.", "note")
        figs = [Path(f).name for f in pd.get("figures") or []]
        sections.append(HtmlSection("PatchDis on held-out collages", figs[0] if figs else None, body))

    if result.overused_before or result.overused_after:
        overuse_figure(result.overused_before, result.overused_after, out / "overused.png")
        n = max(len(result.overused_before), len(result.overused_after))
        table = [[(result.overused_before[i][0] + f" ({100 * result.overused_before[i][1]:.0f}%)")
                  if i < len(result.overused_before) else "",
                  (result.overused_after[i][0] + f" ({100 * result.overused_after[i][1]:.0f}%)")
                  if i < len(result.overused_after) else ""] for i in range(n)]
        sections.append(HtmlSection("Over-used caption words before / after training", "overused.png",
                                    words_table(table, ["before training (untrained text side)", "after training"])
                                    + paragraph("Share of held-out captions in which the word is active although "
                                                "the caption does not contain it (target: none above 20%).",
                                                "note")))

    t5 = result.top5_share
    sections.append(HtmlSection("How much of a hit do its top 5 words explain?", body=words_table(
        [["mean", f"{100 * t5['mean']:.0f}%"], ["median", f"{100 * t5['median']:.0f}%"],
         ["hits with >= 50%", f"{100 * t5['share_of_hits_at_least_half']:.0f}%"]],
        ["share of a caption's top hit's score carried by its 5 largest shared words", ""])))

    # word clouds of held-out images
    img = enc.images * (enc.images > th)
    picks = list(range(0, len(data.image_paths), max(1, len(data.image_paths) // cfg.examples)))[:cfg.examples]
    name_of = {int(k): t for t, k in zip(data.texts, data.text_keys)}
    pictures = [decode_image(data.image_paths[i]) for i in picks]
    titles = [name_of.get(int(data.image_keys[i]), "").replace("an emoji of ", "") for i in picks]
    clouds = model.top_words(img[picks], 40)
    clouds_figure(clouds, pictures, titles, out / "image_words.png")
    table = [[t, int((img[i] > 0).sum()), ", ".join(w for w, _ in ws[:8])] for t, i, ws in zip(titles, picks, clouds)]
    sections.append(HtmlSection("Words of held-out images", "image_words.png",
                                words_table(table, ["image (concept)", "active words", "top words"])))

    txt = enc.texts * (enc.texts > th)
    cap_idx = list(range(0, len(data.texts), max(1, len(data.texts) // 6)))[:6]
    caps = [data.texts[i] for i in cap_idx]
    cap_words = model.top_words(txt[cap_idx], 8)
    caption_words_figure(caps, cap_words, out / "caption_words.png")
    table = [[c, int((txt[i] > 0).sum()), ", ".join(w for w, _ in ws)] for c, i, ws in zip(caps, cap_idx, cap_words)]
    sections.append(HtmlSection("Words that held-out captions activate", "caption_words.png",
                                words_table(table, ["caption", "active words", "top words"])))

    if seg is not None:
        shown = seg.samples[:2]
        images = [s.load_image() for s in shown]
        size = (result.patchdis or {}).get("image_size")
        with torch.no_grad(), model.backbone.at_image_size(size):  # the size PatchDis encoded at
            lex_out = model.encode_image(images, return_patches=True)
        dense_out = None
        if dense is not None:
            with torch.no_grad(), dense.backbone.at_image_size(size):
                dense_out = dense.encode_image(images, return_patches=True)
        maps, row_titles = [], []
        for i, s in enumerate(shown):
            label = s.load_mask()
            present = sorted({int(c) for c in np.unique(label)} - {seg.background, 255})
            names = [seg.class_names[c] for c in present][:2]
            row: list[tuple[str, np.ndarray]] = []
            for name in names:
                prompt = preset.prompt.format(name)
                q = model.encode_text([prompt]).vectors[0]
                row.append((f"LexVLA: {name}"[:40], patch_grid(lex_out.patch_vectors[i], lex_out.grid, q)))
                if dense_out is not None:
                    dq = dense.encode_text([prompt]).vectors[0]
                    row.append((f"dense: {name}"[:40], patch_grid(dense_out.patch_vectors[i], dense_out.grid, dq)))
            maps.append(row or [("(no object)", np.zeros(lex_out.grid))])
            row_titles.append("collage")
        word_patches_figure(images, maps, out / "collage_maps.png", row_titles)
        sections.append(HtmlSection("Where a concept is: LexVLA's words vs the dense patch similarity",
                                    "collage_maps.png",
                                    paragraph("Score of each patch against the concept's prompt: the lexical "
                                              "patch vector's dot product with the prompt's words, and the dense "
                                              "baseline's patch-embedding cosine.", "note")))
        patch_words_figure(images[0], patch_top_words(model, LexicalOutput(lex_out.vectors, lex_out.patch_vectors,
                                                                           lex_out.grid), 0, k=1),
                           lex_out.grid, out / "patch_words.png", title="top word of every patch (held-out collage)")
        sections.append(HtmlSection("Patch words on a held-out collage", "patch_words.png"))

    if curves_figure(metrics, out / "curves.png"):
        sections.append(HtmlSection("Training curves (LexVLA)", "curves.png"))
    run = [["model", cfg.model], ["data", cfg.data], ["steps x batch", f"{cfg.steps} x {cfg.batch_size}"],
           ["trained in this run", "yes" if result.trained_now else "no (cached)"],
           *[[f"time: {k} (s)", v] for k, v in result.timings.items()]]
    sections.append(HtmlSection("Run", body=words_table(run, ["", ""])))
    intro = (f"LexVLA ({cfg.model}) and a dense CLIP-style baseline, trained by `lexvla demo` on the "
             "CPU on the same frozen features, data and LLM, compared on data neither saw in training.")
    return write_html_page(out / "index.html", "LexVLA demo: words you can read", sections, intro)
