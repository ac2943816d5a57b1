"""A small LLaVA-style VLM from the project's parts, and an adapter for Hugging Face LLaVA.

``SmallVLM``: frozen patch backbone (``lexvla.models.backbones``) -> image tokens pooled to
``image_tokens`` -> MLP projector -> causal LLM (``lexvla.models.text.load_causal_lm``; the embedded
SmolLM2 by default), optionally with LoRA. ``HFLlavaVLM`` wraps a ``LlavaForConditionalGeneration``. Both
expose the same two calls that :class:`lexvla.cal.loss.CALLoss` needs: ``multimodal_inputs(...)`` ->
:class:`~lexvla.cal.loss.MultimodalInputs` and ``logits(inputs_embeds=, attention_mask=, position_ids=,
logits_to_keep=)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lexvla.cal.conditions import gaussian_blur
from lexvla.cal.loss import IGNORE_INDEX, MultimodalInputs
from lexvla.config import BackboneConfig, LoraSettings

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"


def _default_backbone() -> BackboneConfig:
    # Early (12: conv2_2, 22: conv3_3) taps keep colour, the last (39) keeps shape: late CNN features
    # alone lose colour. 64 px is easy-vqa's native size (4 x 4 grid at stride 16).
    return BackboneConfig(name="vgg16bn", source="embedded", image_size=64, taps=(12, 22, 39))


@dataclass
class VLMConfig:
    """Configuration of :class:`SmallVLM` (saved as JSON with every checkpoint).

    llm: ``lexvla.models.text.load_causal_lm`` source ("embedded:smollm2", a local folder / cached hub id,
        a .gguf file, or "random" with ``llm_arch`` LlamaConfig overrides and ``tokenizer``).
    llm_layers: keep only the first k decoder layers (None = all); a CPU budget knob.
    image_tokens: number of image tokens in the LLM sequence (a square: the backbone grid is average-pooled
        to sqrt x sqrt), the main cost knob besides the LLM.
    prompt: VQA prompt, must contain ``<image>`` (where the image tokens go) and ``{question}``; the target
        (" answer" + EOS) follows it.
    caption_prompt: prompt for captions (``inspect`` and caption pre-training), must contain ``<image>``.
    lora: LoRA settings used by :meth:`SmallVLM.enable_lora` (stage 2).
    """

    backbone: BackboneConfig = field(default_factory=_default_backbone)
    llm: str = "embedded:smollm2"
    tokenizer: str = "embedded:smollm2"
    llm_arch: dict[str, Any] = field(default_factory=dict)
    llm_layers: int | None = None
    image_tokens: int = 4
    projector_hidden: int | None = None  # None = the LLM width
    prompt: str = "Image:<image>\nQuestion: {question}\nAnswer:"
    caption_prompt: str = "Image:<image>\nCaption:"
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16, dropout=0.0))
    max_length: int = 96

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig(**self.backbone)
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        side = math.isqrt(self.image_tokens) if self.image_tokens > 0 else 0
        if side * side != self.image_tokens:
            raise ValueError(f"VLMConfig.image_tokens must be a positive square (1, 4, 9, ...), got {self.image_tokens}")
        if self.llm_layers is not None and self.llm_layers < 1:
            raise ValueError(f"VLMConfig.llm_layers must be >= 1 or None, got {self.llm_layers}")
        for name in ("prompt", "caption_prompt"):
            if getattr(self, name).count(IMAGE_MARKER) != 1:
                raise ValueError(f"VLMConfig.{name} must contain '{IMAGE_MARKER}' exactly once")
        if "{question}" not in self.prompt:
            raise ValueError("VLMConfig.prompt must contain '{question}'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TokenBatch:
    """Tokenised prompts + targets, left-padded so every target ends at the last position.

    input_ids hold the pad id at image positions (replaced by image embeddings later); labels are -100
    except on target tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    image_mask: torch.Tensor
    target_start: torch.Tensor  # (B,) index of each sequence's first target token

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


class MLPProjector(nn.Module):
    """LLaVA-1.5's projector (Linear-GELU-Linear) after a LayerNorm: CNN features have a scale far from
    the LLM's token embeddings, and the norm keeps the first steps stable."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or out_dim
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def _truncate_layers(llm: nn.Module, k: int) -> None:
    decoder = llm.get_decoder()
    if k > len(decoder.layers):
        raise ValueError(f"VLMConfig.llm_layers={k} but the LLM has only {len(decoder.layers)} layers")
    decoder.layers = decoder.layers[:k]
    llm.config.num_hidden_layers = k
    if getattr(llm.config, "layer_types", None):
        llm.config.layer_types = llm.config.layer_types[:k]


class SmallVLM(nn.Module):
    """Frozen backbone -> pooled image tokens -> MLP projector -> causal LLM (frozen, or LoRA)."""

    def __init__(self, config: VLMConfig, llm: nn.Module | None = None, tokenizer=None,
                 backbone: nn.Module | None = None) -> None:
        """``llm``/``tokenizer``/``backbone`` may be passed in to share loaded weights across runs (the
        LLM is deep-copied by the caller if several models must not share LoRA layers)."""
        super().__init__()
        from lexvla.models.backbones import create_backbone
        from lexvla.models.text import load_causal_lm

        self.config = config
        if llm is None:
            llm, tokenizer = load_causal_lm(config.llm, tokenizer=config.tokenizer, arch=config.llm_arch)
        if tokenizer is None:
            raise ValueError("SmallVLM: a tokenizer must be given together with the llm")
        if config.llm_layers is not None:
            _truncate_layers(llm, config.llm_layers)
        for p in llm.parameters():
            p.requires_grad_(False)
        llm.config.use_cache = False
        self.llm = llm
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.backbone = backbone if backbone is not None else create_backbone(config.backbone)
        width = llm.get_input_embeddings().weight.shape[1]
        self.projector = MLPProjector(self.backbone.embed_dim, width, config.projector_hidden)
        self.lora_enabled = False

    # ------------------------------------------------------------------ parts
    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    def enable_lora(self) -> None:
        """Wrap the LLM with fresh LoRA adapters (stage 2); the base weights stay frozen."""
        if self.lora_enabled:
            return
        from peft import LoraConfig, get_peft_model

        lora = self.config.lora
        self.llm = get_peft_model(self.llm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                       target_modules=list(lora.target_modules)))
        self.lora_enabled = True

    def set_stage(self, stage: str) -> None:
        """"pretrain": only the projector trains; "finetune": projector + LoRA (enabled here)."""
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"unknown training stage '{stage}'; choose 'pretrain' or 'finetune'")
        if stage == "finetune":
            self.enable_lora()
        for name, p in self.llm.named_parameters():
            p.requires_grad_(stage == "finetune" and "lora_" in name)
        for p in self.projector.parameters():
            p.requires_grad_(True)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: projector and LoRA weights."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if k.startswith("projector.") or "lora_" in k}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen backbone patch tokens (B, P, C) of preprocessed pixels."""
        return self.backbone(pixels.to(self.device))

    def preprocess(self, images) -> torch.Tensor:
        return self.backbone.preprocess(images)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, C) backbone tokens on a square grid -> (B, image_tokens, D) LLM embeddings."""
        b, p, c = features.shape
        g = math.isqrt(p)
        if g * g != p:
            raise ValueError(f"image features must lie on a square grid, got {p} tokens")
        side = math.isqrt(self.config.image_tokens)
        if side != g:
            grid = features.transpose(1, 2).reshape(b, c, g, g)
            features = F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)
        return self.projector(features.to(self.device, self.projector.fc1.weight.dtype))

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: Sequence[str], targets: Sequence[str | None]) -> TokenBatch:
        """Prompts (each with one ``<image>``) + targets (None = no target, for scoring) -> left-padded
        batch. Targets are followed by EOS so the model learns to stop."""
        if len(prompts) != len(targets) or not prompts:
            raise ValueError(f"need as many targets as prompts (and at least one): {len(prompts)} vs {len(targets)}")
        tok, n_img = self.tokenizer, self.config.image_tokens
        rows = []
        for prompt, target in zip(prompts, targets, strict=True):
            if prompt.count(IMAGE_MARKER) != 1:
                raise ValueError(f"prompt must contain '{IMAGE_MARKER}' exactly once: {prompt!r}")
            before, after = prompt.split(IMAGE_MARKER)
            ids_b = tok(before, add_special_tokens=False).input_ids
            ids_a = tok(after, add_special_tokens=False).input_ids
            ids_t = [] if target is None else tok(target, add_special_tokens=False).input_ids + [tok.eos_token_id]
            ids = ids_b + [self.pad_id] * n_img + ids_a + ids_t
            if len(ids) > self.config.max_length:
                raise ValueError(f"sequence of {len(ids)} tokens exceeds max_length={self.config.max_length}: "
                                 f"{prompt!r} + {target!r}")
            labels = [IGNORE_INDEX] * (len(ids) - len(ids_t)) + ids_t
            img = [False] * len(ids_b) + [True] * n_img + [False] * (len(ids_a) + len(ids_t))
            rows.append((ids, labels, img, len(ids) - len(ids_t)))
        t = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((len(rows), t), dtype=torch.long)
        image_mask = torch.zeros((len(rows), t), dtype=torch.bool)
        start = torch.zeros(len(rows), dtype=torch.long)
        for i, (ids, lab, img, s) in enumerate(rows):
            off = t - len(ids)
            input_ids[i, off:] = torch.tensor(ids)
            labels[i, off:] = torch.tensor(lab)
            attn[i, off:] = 1
            image_mask[i, off:] = torch.tensor(img)
            start[i] = off + s
        # positions count real tokens only: a left-padded sequence gets the positions it has alone
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        return TokenBatch(input_ids, attn, position_ids, labels, image_mask, start)

    def vqa_prompts(self, questions: Sequence[str]) -> list[str]:
        return [self.config.prompt.format(question=q.strip()) for q in questions]

    # ------------------------------------------------------------------ CAL contract
    def _merge(self, tokens: TokenBatch, image_embeds: torch.Tensor) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(tokens.input_ids)
        n = int(tokens.image_mask.sum())
        if n != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(f"{n} image positions in the batch but {tuple(image_embeds.shape[:2])} image tokens")
        return embeds.masked_scatter(tokens.image_mask.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def multimodal_inputs(self, tokens: TokenBatch, features: torch.Tensor,
                          blurred_features: torch.Tensor | None = None) -> MultimodalInputs:
        """Merge projected image tokens into the text embeddings. ``features``: backbone tokens (B, P, C)
        (precomputed or from :meth:`image_features`); ``blurred_features`` the same for blurred images
        (only for CAL's "blur" condition)."""
        tokens = tokens.to(self.device)
        embeds = self._merge(tokens, self.project(features))
        blurred = None
        if blurred_features is not None:
            with torch.no_grad():
                blurred = self._merge(tokens, self.project(blurred_features))
        return MultimodalInputs(embeds, tokens.attention_mask, tokens.position_ids, tokens.labels,
                                tokens.image_mask, blurred)

    def blurred_features(self, pixels: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.image_features(gaussian_blur(pixels.to(self.device), sigma))

    def logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               logits_to_keep: int = 0) -> torch.Tensor:
        """(B, k, V) logits of the last ``logits_to_keep`` positions (0 = all)."""
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=logits_to_keep, use_cache=False)
        return out.logits

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def answer_scores(self, questions: Sequence[str], features: torch.Tensor,
                      candidates: Sequence[str]) -> torch.Tensor:
        """(B, len(candidates)) logits of each candidate answer's first token after the VQA prompt
        (closed-set evaluation; the candidates' first tokens must differ)."""
        first = [self.tokenizer(c, add_special_tokens=False).input_ids[0] for c in candidates]
        if len(set(first)) != len(first):
            raise ValueError(f"candidate answers share a first token, cannot score them apart: {list(candidates)}")
        tokens = self.tokenize(self.vqa_prompts(questions), [None] * len(questions)).to(self.device)
        embeds = self._merge(tokens, self.project(features))
        logits = self.logits(embeds, tokens.attention_mask, tokens.position_ids, logits_to_keep=1)[:, -1]
        return logits[:, torch.tensor(first, device=logits.device)].float()

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> Path:
        """config.json + trainable.safetensors (projector and LoRA weights only; the frozen LLM and
        backbone are re-created from the config)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"config": self.config.to_dict(), "lora_enabled": self.lora_enabled}
        (path / "config.json").write_text(json.dumps(meta, indent=2))
        save_file({k: v.contiguous() for k, v in self.trainable_state_dict().items()}, path / "trainable.safetensors")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, **parts: Any) -> SmallVLM:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a SmallVLM checkpoint (no config.json)")
        meta = json.loads((path / "config.json").read_text())
        model = cls(VLMConfig(**meta["config"]), **parts)
        if meta.get("lora_enabled"):
            model.enable_lora()
        model.load_trainable(load_file(path / "trainable.safetensors"))
        return model

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        expected = set(self.trainable_state_dict())
        absent = expected - set(state)
        if unexpected or absent:
            raise ValueError(f"checkpoint does not fit this model: missing={sorted(absent)[:5]} "
                             f"unexpected={sorted(unexpected)[:5]}")


class HFLlavaVLM(nn.Module):
    """CAL contract around a Hugging Face ``LlavaForConditionalGeneration``: image features replace the
    ``image_token_id`` placeholders in ``input_ids`` exactly as the model's own forward does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.image_token_id = model.config.image_token_id

    def multimodal_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                          pixel_values: torch.Tensor, position_ids: torch.Tensor | None = None,
                          blurred_pixel_values: torch.Tensor | None = None) -> MultimodalInputs:
        image_mask = input_ids == self.image_token_id
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        labels = labels.masked_fill(image_mask, IGNORE_INDEX)
        embeds = self._merge(input_ids, image_mask, pixel_values)
        blurred = None
        if blurred_pixel_values is not None:
            with torch.no_grad():
                blurred = self._merge(input_ids, image_mask, blurred_pixel_values)
        return MultimodalInputs(embeds, attention_mask, position_ids, labels, image_mask, blurred)

    def _merge(self, input_ids: torch.Tensor, image_mask: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        ids = input_ids.masked_fill(image_mask, 0)  # the placeholder id may lie outside the text vocabulary
        embeds = self.model.get_input_embeddings()(ids)
        feats = self.model.get_image_features(pixel_values=pixel_values)
        if not isinstance(feats, torch.Tensor):  # newer transformers: an output object or a list per image
            feats = getattr(feats, "pooler_output", None) if hasattr(feats, "pooler_output") else feats
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], 0) if isinstance(feats, (list, tuple)) else feats
        feats = feats.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        if feats.shape[0] != int(image_mask.sum()):
            raise ValueError(f"{int(image_mask.sum())} image placeholder tokens but {feats.shape[0]} image features")
        return embeds.masked_scatter(image_mask.unsqueeze(-1), feats)

    def logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               logits_to_keep: int = 0) -> torch.Tensor:
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=logits_to_keep, use_cache=False).logits
