"""Per-token visual correlation of a caption (the paper's Figure 2a) and ranking of noisy captions.

For each caption token, the raw logit of that token with the image minus without it (image positions
removed from attention, CAL's contrast): large positive = the image supports the token, near zero = the
token does not depend on the image, negative = the image argues against it.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lexvla.cal.captions import Word, text_words, token_words
from lexvla.cal.data import format_target
from lexvla.cal.finder import FinderConfig, ScoredCaption, score_caption
from lexvla.cal.loss import CALConfig, CALLoss, ground_truth_logits
from lexvla.cal.vlm import SmallVLM

logger = logging.getLogger(__name__)


@dataclass
class TokenCorrelation:
    """One caption: its tokens (decoded pieces, EOS excluded) and each token's logit difference."""

    text: str
    tokens: list[str]
    logit_diff: list[float]
    token_ids: list[int] = field(default_factory=list)
    logprob: list[float] = field(default_factory=list)  # log p(token | image, prefix)
    logprob_text: list[float] = field(default_factory=list)  # log p(token | prefix), image removed
    logprob_marginal: list[float] | None = None  # log p(token | prefix), marginal over reference images

    @property
    def pmi(self) -> list[float]:
        """Per token, how much the image raises its log-probability over the text-only prediction."""
        return [a - b for a, b in zip(self.logprob, self.logprob_text, strict=True)]

    @property
    def pmi_marginal(self) -> list[float]:
        """Per token, how much the image raises its log-probability over the reference images' marginal."""
        if self.logprob_marginal is None:
            raise ValueError(f"caption {self.text!r} was scored without reference images (signal pmi_marginal)")
        return [a - b for a, b in zip(self.logprob, self.logprob_marginal, strict=True)]

    def signal(self, name: str) -> list[float]:
        """The per-token values of a finder signal (:data:`lexvla.cal.finder.SIGNALS`)."""
        if name == "logit_diff":
            return self.logit_diff
        if name == "pmi":
            return self.pmi
        if name == "pmi_marginal":
            return self.pmi_marginal
        raise ValueError(f"unknown finder signal {name!r}")

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
    lp = ground_truth_logits(logits.float().log_softmax(-1), labels).cpu()
    lp_wo = ground_truth_logits(logits_wo.float().log_softmax(-1), labels).cpu()
    out = []
    eos = model.tokenizer.eos_token_id
    for i, text in enumerate(texts):
        ids = labels[i, 1:].tolist()
        row = TokenCorrelation(text, [], [])
        for j, tid in enumerate(ids):
            if tid == -100 or tid == eos:
                continue
            row.tokens.append(model.tokenizer.decode([tid]))
            row.logit_diff.append(float(diff[i, j]))
            row.token_ids.append(tid)
            row.logprob.append(float(lp[i, j]))
            row.logprob_text.append(float(lp_wo[i, j]))
        out.append(row)
    return out


def _colour(value: float | None, scale: float) -> tuple[float, float, float]:
    """Diverging colour centred at zero (yellow), red below, green above; None (unscored) is grey."""
    from matplotlib import colormaps

    if value is None:
        return 0.85, 0.85, 0.85
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


Values = Sequence[Sequence[float | None]]
RAW_LEGEND = ("Raw logit of each caption token with the image minus without it "
              "(green: the image supports the token; red: the image argues against it).")
FINDER_LEGEND = ("Finder score of each content token: log-probability with the image minus without it, relative "
                 "to the caption's function tokens (green: the image supports the word; red: the image contradicts "
                 "it; grey: function words and separators, not scored). Colour scale centred at zero.")


def _scale(values: Values) -> float:
    return max([abs(v) for r in values for v in r if v is not None] + [1e-6])


def render_html(rows: Sequence[TokenCorrelation], path: str | Path, title: str = "", image=None,
                values: Values | None = None, legend: str = RAW_LEGEND, notes: Sequence[str] | None = None) -> Path:
    """Tokens as coloured spans (green: supported by the image, red: contradicted); values on hover and
    under each token. ``values`` per row and token (default: the raw logit differences; None = grey);
    ``notes`` one line per row shown under it. ``image``: a PIL image (embedded inline) or None."""
    values = [r.logit_diff for r in rows] if values is None else values
    scale = _scale(values)
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title or 'CAL token correlation')}</title>",
             "<style>body{font-family:sans-serif} .tok{display:inline-block;margin:2px;padding:4px 6px;"
             "border-radius:4px;text-align:center;font-size:18px} .val{display:block;font-size:11px;color:#333}"
             "</style></head><body>"]
    if title:
        parts.append(f"<h3>{html.escape(title)}</h3>")
    if image:
        parts.append(f"<img src='{_data_uri(image)}' width='128' style='image-rendering:pixelated'><br>")
    parts.append(f"<p>{html.escape(legend)}</p>")
    for n, (row, vals) in enumerate(zip(rows, values, strict=True)):
        parts.append("<div style='margin:8px 0'>")
        for tok, v in zip(row.tokens, vals, strict=True):
            r, g, b = _colour(v, scale)
            shown = "" if v is None else f"{v:+.2f}"
            parts.append(f"<span class='tok' title='{shown or 'not scored'}' style='background:rgb({int(r * 255)},"
                         f"{int(g * 255)},{int(b * 255)})'>{html.escape(tok.strip() or '␣')}"
                         f"<span class='val'>{shown or '&nbsp;'}</span></span>")
        if notes:
            parts.append(f"<div class='val'>{html.escape(notes[n])}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts))
    return path


def render_png(rows: Sequence[TokenCorrelation], path: str | Path, image=None, title: str = "",
               values: Values | None = None, label: str = "logit diff") -> Path:
    """Heat map figure: the image (optional) on the left, one line of coloured tokens per caption; colour
    scale symmetric around zero (``values`` as in :func:`render_html`)."""
    values = [r.logit_diff for r in rows] if values is None else values
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    scale = _scale(values)
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
    for y, (row, vals) in enumerate(zip(rows, values, strict=True)):
        for x, (tok, v) in enumerate(zip(row.tokens, vals, strict=True)):
            ax.add_patch(plt.Rectangle((x + 0.04, y + 0.1), 0.92, 0.8, color=_colour(v, scale)))
            ink = "white" if v is not None and abs(v) > 0.6 * scale else "black"  # dark at both ends of the map
            ax.text(x + 0.5, y + 0.42, tok.strip() or "␣", ha="center", va="center", fontsize=12, color=ink)
            if v is not None:
                ax.text(x + 0.5, y + 0.75, f"{v:+.1f}", ha="center", va="center", fontsize=8, color=ink)
    cax = fig.add_axes((0.89, 0.12, 0.02, 0.76))
    sm = plt.cm.ScalarMappable(cmap="RdYlGn", norm=Normalize(-scale, scale))
    fig.colorbar(sm, cax=cax, label=label)
    if title:
        fig.suptitle(title, fontsize=10, x=0.45, y=0.98)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def find_noisy(row: TokenCorrelation, tokenizer, words: Sequence[Word] | None = None,
               config: FinderConfig | None = None) -> ScoredCaption:
    """The finder's scores (:mod:`lexvla.cal.finder`) of one scored caption; ``words`` default to the
    caption's own words (:func:`lexvla.cal.captions.text_words`)."""
    config = config or FinderConfig()
    words = text_words(row.text.strip()) if words is None else words
    ids, token_word = token_words(tokenizer, row.text.strip(), words)
    if ids != row.token_ids:
        raise ValueError(f"caption {row.text!r}: its tokens with offsets differ from the scored tokens")
    return score_caption(row.signal(config.signal), token_word, [w.content for w in words], [-v for v in row.logprob],
                         config.normalise)


@torch.no_grad()
def target_logprobs(model: SmallVLM, features: torch.Tensor, texts: Sequence[str], prompt: str | None = None,
                    with_image: bool = True) -> list[list[float]]:
    """Per text, log p of each target token (EOS excluded) after ``prompt`` (default: the caption prompt),
    with the image of the matching ``features`` row, or with the image removed (CAL's condition)."""
    model.eval()
    prompt = model.config.caption_prompt if prompt is None else prompt
    tokens = model.tokenize([prompt] * len(texts), [format_target(t) for t in texts])
    inputs = model.multimodal_inputs(tokens, features)
    keep = inputs.label_span()
    if with_image:
        logits = model.logits(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, keep)
    else:
        logits = CALLoss(CALConfig()).without_image_logits(model.logits, inputs, keep)
    labels = inputs.labels[:, -keep:]
    lp = ground_truth_logits(logits.float().log_softmax(-1), labels).cpu()
    eos = model.tokenizer.eos_token_id
    out = []
    for i in range(len(texts)):
        ids = labels[i, 1:].tolist()
        out.append([float(lp[i, j]) for j, t in enumerate(ids) if t not in (-100, eos)])
    return out


@torch.no_grad()
def marginal_logprobs(model: SmallVLM, reference: torch.Tensor, texts: Sequence[str],
                      batch_size: int = 32) -> dict[str, list[float]]:
    """Per unique text, each token's log-probability under the marginal over the ``reference`` images
    (K, P, C): ``log mean_k p(y_<=t | image_k) - log mean_k p(y_<t | image_k)``, so the prefix shifts the
    belief over which image it is (a model that knows the kind of image but not which)."""
    if reference.dim() != 3 or reference.shape[0] < 1:
        raise ValueError(f"reference features must be (K, P, C) with K >= 1, got {tuple(reference.shape)}")
    k = reference.shape[0]
    out: dict[str, list[float]] = {}
    for text in dict.fromkeys(t.strip() for t in texts):
        per_ref: list[list[float]] = []
        for i in range(0, k, batch_size):
            ref = reference[i:i + batch_size].float()
            per_ref += target_logprobs(model, ref, [text] * ref.shape[0])
        cum = torch.tensor(per_ref).cumsum(1)  # (K, T): log p(y_<=t | image_k)
        log_k = torch.log(torch.tensor(float(k)))
        joint = torch.logsumexp(cum, 0) - log_k  # log mean_k p(y_<=t | image_k)
        prev = torch.cat([torch.zeros(1), joint[:-1]])
        out[text] = (joint - prev).tolist()
    return out


@torch.no_grad()
def score_pairs(model: SmallVLM, images: Sequence[str], captions: Sequence[str], features: dict[str, torch.Tensor],
                batch_size: int = 32, reference: torch.Tensor | None = None) -> list[TokenCorrelation]:
    """:func:`token_correlations` of every (image, caption) pair, in order, batched; with ``reference``
    features (K, P, C) also each token's marginal over those images (signal ``pmi_marginal``)."""
    rows: list[TokenCorrelation] = []
    for i in range(0, len(captions), batch_size):
        feats = torch.stack([features[p] for p in images[i:i + batch_size]]).float()
        rows += token_correlations(model, feats, [c.strip() for c in captions[i:i + batch_size]])
    if reference is not None:
        marginal = marginal_logprobs(model, reference, captions, batch_size)
        for row in rows:
            row.logprob_marginal = marginal[row.text.strip()]
            if len(row.logprob_marginal) != len(row.logprob):
                raise ValueError(f"caption {row.text!r}: marginal and scored token counts differ")
    return rows


def reference_features(features: dict[str, torch.Tensor], k: int = 16, seed: int = 0) -> torch.Tensor:
    """A seeded sample of ``k`` distinct images' features (all if fewer), stacked (K, P, C): the
    reference images of signal ``pmi_marginal``."""
    import random

    keys = sorted(features)
    if not keys:
        raise ValueError("no features to draw reference images from")
    pick = random.Random(seed).sample(keys, min(k, len(keys)))
    return torch.stack([features[p] for p in pick]).float()


def rank_captions(model: SmallVLM, images: Sequence[str], captions: Sequence[str], features: dict[str, torch.Tensor],
                  batch_size: int = 32, config: FinderConfig | None = None, reference: torch.Tensor | None = None,
                  ) -> list[tuple[int, TokenCorrelation, ScoredCaption]]:
    """(index, correlation, finder score) of every (image, caption) pair, most contradicted content word
    first: candidates for noisy captions. Signal ``pmi_marginal`` needs ``reference`` features."""
    rows = score_pairs(model, images, captions, features, batch_size, reference)
    scored = [(i, row, find_noisy(row, model.tokenizer, config=config)) for i, row in enumerate(rows)]
    return sorted(scored, key=lambda item: (item[2].score if item[2].worst_word is not None else float("inf")))
