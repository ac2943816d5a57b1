"""Per-token visual correlation of a caption (the paper's Figure 2a) and ranking of noisy captions.

For each caption token, the raw logit of that token with the image minus without it (image positions
removed from attention, CAL's contrast): large positive = the image supports the token, near zero = the
token does not depend on the image, negative = the image argues against it.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lexvla.cal.data import format_target
from lexvla.cal.loss import CALConfig, CALLoss, ground_truth_logits
from lexvla.cal.vlm import SmallVLM

logger = logging.getLogger(__name__)


@dataclass
class TokenCorrelation:
    """One caption: its tokens (decoded pieces, EOS excluded) and each token's logit difference."""

    text: str
    tokens: list[str]
    logit_diff: list[float]

    @property
    def min_diff(self) -> float:
        return min(self.logit_diff) if self.logit_diff else float("nan")

    def least_supported(self) -> tuple[str, float]:
        i = min(range(len(self.tokens)), key=lambda k: self.logit_diff[k])
        return self.tokens[i], self.logit_diff[i]


@torch.no_grad()
def token_correlations(model: SmallVLM, features: torch.Tensor, texts: Sequence[str],
                       question: str | Sequence[str] | None = None, condition: str = "remove") -> list[TokenCorrelation]:
    """Logit differences for every text (each scored against the matching row of ``features`` (B, P, C);
    one row is broadcast to all texts). ``question`` (one, or one per text) scores the texts as answers
    to a VQA prompt instead of as captions."""
    if features.dim() == 2:
        features = features.unsqueeze(0)
    if features.shape[0] == 1 and len(texts) > 1:
        features = features.expand(len(texts), -1, -1)
    if features.shape[0] != len(texts):
        raise ValueError(f"{features.shape[0]} feature rows for {len(texts)} texts")
    model.eval()
    if question is None:
        prompts = [model.config.caption_prompt] * len(texts)
    else:
        prompts = model.vqa_prompts([question] * len(texts) if isinstance(question, str) else question)
    tokens = model.tokenize(prompts, [format_target(t) for t in texts])
    inputs = model.multimodal_inputs(tokens, features)
    loss = CALLoss(CALConfig(condition=condition))
    keep = inputs.label_span()
    logits = model.logits(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, keep)
    logits_wo = loss.without_image_logits(model.logits, inputs, keep)
    labels = inputs.labels[:, -keep:]
    diff = (ground_truth_logits(logits, labels) - ground_truth_logits(logits_wo, labels)).cpu()
    out = []
    eos = model.tokenizer.eos_token_id
    for i, text in enumerate(texts):
        ids = labels[i, 1:].tolist()
        pieces, values = [], []
        for j, tid in enumerate(ids):
            if tid == -100 or tid == eos:
                continue
            pieces.append(model.tokenizer.decode([tid]))
            values.append(float(diff[i, j]))
        out.append(TokenCorrelation(text, pieces, values))
    return out


def _colour(value: float, scale: float) -> tuple[float, float, float]:
    from matplotlib import colormaps

    x = 0.5 + 0.5 * max(-1.0, min(1.0, value / scale))
    r, g, b, _ = colormaps["RdYlGn"](x)
    return r, g, b


def _data_uri(image) -> str:
    """PIL image -> inline PNG, so the HTML page is self-contained."""
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def render_html(rows: Sequence[TokenCorrelation], path: str | Path, title: str = "", image=None) -> Path:
    """Tokens as coloured spans (green: supported by the image, red: contradicted); values on hover and
    under each token. ``image``: a PIL image (embedded inline) or None."""
    scale = max([abs(v) for r in rows for v in r.logit_diff] + [1e-6])
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title or 'CAL token correlation')}</title>",
             "<style>body{font-family:sans-serif} .tok{display:inline-block;margin:2px;padding:4px 6px;"
             "border-radius:4px;text-align:center;font-size:18px} .val{display:block;font-size:11px;color:#333}"
             "</style></head><body>"]
    if title:
        parts.append(f"<h3>{html.escape(title)}</h3>")
    if image:
        parts.append(f"<img src='{_data_uri(image)}' width='128' style='image-rendering:pixelated'><br>")
    parts.append("<p>Raw logit of each caption token with the image minus without it "
                 "(green: the image supports the token; red: the image argues against it).</p>")
    for row in rows:
        parts.append("<div style='margin:8px 0'>")
        for tok, v in zip(row.tokens, row.logit_diff, strict=True):
            r, g, b = _colour(v, scale)
            parts.append(f"<span class='tok' title='{v:+.2f}' style='background:rgb({int(r * 255)},{int(g * 255)},"
                         f"{int(b * 255)})'>{html.escape(tok.strip() or '␣')}<span class='val'>{v:+.2f}</span></span>")
        parts.append("</div>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts))
    return path


def render_png(rows: Sequence[TokenCorrelation], path: str | Path, image=None, title: str = "") -> Path:
    """Heat map figure: the image (optional) on the left, one line of coloured tokens per caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    scale = max([abs(v) for r in rows for v in r.logit_diff] + [1e-6])
    width = max(len(r.tokens) for r in rows) * 1.25 + (2.6 if image is not None else 0.5) + 1.2
    fig = plt.figure(figsize=(max(6.0, width), 1.0 + 0.95 * len(rows)), dpi=130)
    left = 0.0
    if image is not None:
        ax_img = fig.add_axes((0.01, 0.08, 0.16 * 6 / max(6.0, width) * 1.6, 0.84))
        ax_img.imshow(image)
        ax_img.set_axis_off()
        left = ax_img.get_position().x1 + 0.01
    ax = fig.add_axes((left, 0.05, 0.86 - left, 0.8 if title else 0.9))
    ax.set_xlim(0, max(len(r.tokens) for r in rows))
    ax.set_ylim(len(rows), 0)
    ax.set_axis_off()
    for y, row in enumerate(rows):
        for x, (tok, v) in enumerate(zip(row.tokens, row.logit_diff, strict=True)):
            ax.add_patch(plt.Rectangle((x + 0.04, y + 0.1), 0.92, 0.8, color=_colour(v, scale)))
            ink = "white" if abs(v) > 0.6 * scale else "black"  # dark cells at both ends of the colour map
            ax.text(x + 0.5, y + 0.42, tok.strip() or "␣", ha="center", va="center", fontsize=12, color=ink)
            ax.text(x + 0.5, y + 0.75, f"{v:+.1f}", ha="center", va="center", fontsize=8, color=ink)
    cax = fig.add_axes((0.89, 0.12, 0.02, 0.76))
    sm = plt.cm.ScalarMappable(cmap="RdYlGn", norm=Normalize(-scale, scale))
    fig.colorbar(sm, cax=cax, label="logit diff")
    if title:
        fig.suptitle(title, fontsize=10, x=0.45, y=0.98)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


@torch.no_grad()
def rank_captions(model: SmallVLM, images: Sequence[str], captions: Sequence[str], features: dict[str, torch.Tensor],
                  batch_size: int = 32) -> list[tuple[int, TokenCorrelation]]:
    """(index, correlation) of every (image, caption) pair, least-supported token first: candidates for
    noisy captions."""
    scored: list[tuple[int, TokenCorrelation]] = []
    for i in range(0, len(captions), batch_size):
        feats = torch.stack([features[p] for p in images[i:i + batch_size]]).float()
        rows = token_correlations(model, feats, list(captions[i:i + batch_size]))
        scored += list(enumerate(rows, start=i))
    return sorted(scored, key=lambda item: item[1].min_diff)
