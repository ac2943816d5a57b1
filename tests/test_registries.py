"""Everything a registry lists works, looped from the registry itself (no hand-written lists): every zoo
model builds without its weights, every backbone encodes pixels, every regulariser gives a finite loss;
and no registry takes a name twice."""

from __future__ import annotations

import pytest
import torch

from lexvla._assets import AssetNotFoundError
from lexvla._registry import Registry
from lexvla.config import BackboneConfig
from lexvla.losses import REGULARISERS, LexVLALoss
from lexvla.models.backbones import create_backbone, list_backbones, register_backbone
from lexvla.models.text import load_tokenizer
from lexvla.models.zoo import create_model, get_config, list_models, register_model


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_builds_without_weights(name):
    """pretrained=False (timm's switch): the architecture from the config, no weight file needed. On the
    meta device, so the 7B paper model costs no memory."""
    cfg = get_config(name)
    overrides = {}
    try:
        load_tokenizer(cfg.text.tokenizer)
    except AssetNotFoundError:
        # Llama 2's tokenizer is on no registry we may use: build the architecture around SmolLM2's
        # tokenizer instead (the LLM's head then has its rows, every other shape is the zoo entry's).
        arch = {k: v for k, v in cfg.text.arch.items() if k != "vocab_size"}
        overrides = {"text.tokenizer": "embedded:smollm2", "text.arch": arch}
    with torch.device("meta"):
        model = create_model(name, pretrained=False, **overrides)
    assert model.config.backbone.source == "random" and model.config.text.source == "random"
    for key, value in overrides.get("text.arch", cfg.text.arch).items():  # the configured architecture
        assert getattr(model.text.llm.config, key) == value, key
    if name == "lexvla-dinov2-b14-llama2-7b":  # the paper's sizes
        assert _count(model.backbone) == 86_580_480  # DINOv2-B/14
        lora = sum(p.numel() for n, p in model.text.llm.named_parameters() if "lora_" in n)
        assert lora == 32 * 4 * 2 * 20 * 4096  # r=20 on q,k,v,o of 32 layers: the paper's ~21M
        assert 15e6 < _count(model.adapter) < 18e6  # the paper's ~17M


def test_weights_must_match_the_configured_architecture(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    arch = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 14, "image_size": 28}
    Dinov2Model(Dinov2Config(**arch)).save_pretrained(tmp_path / "dino")
    ok = create_backbone(BackboneConfig(name="dinov2", source=str(tmp_path / "dino"), image_size=28, arch=arch))
    assert ok.embed_dim == 32
    with pytest.raises(ValueError, match="hidden_size: arch=64 weights=32"):
        create_backbone(BackboneConfig(name="dinov2", source=str(tmp_path / "dino"), image_size=28,
                                       arch={**arch, "hidden_size": 64}))


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_encodes_pixels(name):
    # The architecture of the smallest zoo entry using it (DINOv2's default is ViT-B: 10 s to build).
    zoo = sorted((get_config(m).backbone for m in list_models() if get_config(m).backbone.name == name),
                 key=lambda b: b.image_size)
    arch = zoo[0].arch if zoo else {}
    backbone = create_backbone(BackboneConfig(name=name, source="random", image_size=56, grid=2, arch=arch))
    tokens = backbone(torch.rand(2, 3, 56, 56))
    assert tokens.shape == (2, 4, backbone.embed_dim) and torch.isfinite(tokens).all()
    assert not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("name", sorted(REGULARISERS))
def test_every_regulariser_gives_a_finite_loss(name):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.rand(4, 10, generator=g), torch.rand(4, 10, generator=g)
    out = LexVLALoss(name, image_weight=0.5, text_weight=0.5, ramp_steps=0)(img, txt, torch.tensor(10.0))
    assert torch.isfinite(out.loss) and "contrastive" in out.terms
    assert (len(out.terms) == 1) == (REGULARISERS[name] is None)


def test_registries_refuse_a_second_registration_of_a_name():
    with pytest.raises(ValueError, match="model 'lexvla-tiny' is already registered"):
        register_model("lexvla-tiny")(lambda: get_config("lexvla-tiny"))
    with pytest.raises(ValueError, match="backbone 'dinov2' is already registered"):
        register_backbone("dinov2")(lambda cfg: None)
    reg: Registry[int] = Registry("thing")
    reg["a"] = 1
    with pytest.raises(ValueError, match="thing 'a'"):
        reg["a"] = 2
    assert reg == {"a": 1}


def test_an_unknown_name_lists_what_each_registry_has():
    from lexvla.eval.retrieval_data import RetrievalDataConfig, load_retrieval_set

    with pytest.raises(ValueError, match=r"unknown backbone 'vit-h'; available: .*dinov2"):
        create_backbone(BackboneConfig(name="vit-h"))
    with pytest.raises(ValueError, match=r"unknown retrieval data set 'flickr9k'; available: .*coco"):
        load_retrieval_set("flickr9k", RetrievalDataConfig())
    reg: Registry[int] = Registry("thing")
    reg.register("b")(2)
    assert reg.lookup("b") == 2 and reg.names() == ["b"]


def test_models_command_says_weights_present_and_trained(tmp_path, monkeypatch, capsys, tiny_model):
    import json

    from lexvla.cli import main
    from lexvla.models.zoo import save_trained

    monkeypatch.setenv("LEXVLA_CACHE", str(tmp_path))
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(list_models())
    assert rows["lexvla-tiny"]["weights"] == {"backbone": "none needed", "text": "none needed"}
    assert rows["lexvla-tiny"]["trained"] is None
    assert rows["lexvla-dinov2-b14-llama2-7b"]["weights"]["text"].startswith("missing")  # not on this machine
    saved = save_trained(tiny_model, "lexvla-tiny")
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["lexvla-tiny"]["trained"] == str(saved)
