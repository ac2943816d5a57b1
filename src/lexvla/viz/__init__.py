"""Pictures of lexical representations: word clouds, per-patch top words, text -> patch heat maps.

All drawing uses pyplot-free matplotlib figures (Agg), so it works headless and inside the web server.

Quick use::

    from lexvla import viz
    viz.word_cloud([("dog", 0.4), ("beach", 0.2)], "cloud.png")
    out = model.encode_image([img], return_patches=True)
    viz.patch_words_figure(img, viz.patch_top_words(model, out), out.grid, "patches.png")
    txt = model.sparsify(model.encode_text(["a dog"]))
    viz.text_heatmap(img, viz.text_patch_scores(out, txt), "heat.png", text="a dog")
    viz.render_explanation(viz.explain_image(model, "photo.jpg", ["a dog"]), "out/")   # all + HTML
"""

from .explain import (
    ExplainFiles,
    ImageExplanation,
    TextMatch,
    explain_image,
    render_explanation,
    shared_words,
)
from .html import HtmlSection, write_html_page
from .patches import (
    draw_patch_words,
    draw_text_heatmap,
    patch_top_words,
    patch_words_figure,
    text_heatmap,
    text_patch_scores,
    upsample_scores,
)
from .wordcloud import WordCloudConfig, WordCloudLayout, draw_word_cloud, layout_word_cloud, word_cloud

__all__ = [
    "ExplainFiles", "HtmlSection", "ImageExplanation", "TextMatch", "WordCloudConfig", "WordCloudLayout",
    "draw_patch_words", "draw_text_heatmap", "draw_word_cloud", "explain_image", "layout_word_cloud",
    "patch_top_words", "patch_words_figure", "render_explanation", "shared_words", "text_heatmap",
    "text_patch_scores", "upsample_scores", "word_cloud", "write_html_page",
]
