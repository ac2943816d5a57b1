"""Training config, overrides, parameter groups, schedule, pickle-free optimiser/RNG state, CLI wiring."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lexvla.checkpoint import optimizer_from_files, optimizer_to_files, rng_state, set_rng_state
from lexvla.train.cli import register
from lexvla.train.config import PARAM_GROUPS, TrainConfig, load_config, parse_value
from lexvla.train.optim import WarmupCosine, build_optimizer, group_of

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "lexvla" / "configs"


def test_shipped_configs_load() -> None:
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert "tiny.yaml" in names and "paper-cc12m.yaml" in names
    for p in CONFIGS.glob("*.yaml"):
        cfg = load_config(p)
        assert cfg.data.batch_size >= 1
    paper = load_config(CONFIGS / "paper-cc12m.yaml")
    assert paper.model.name == "lexvla-dinov2-b14-llama2-7b" and paper.data.source == "shards"


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"steps": 5, "optim": {"lr": {"adapter": "1e-4"}},
                                    "data": {"options": {"split": "train"}}}))
    cfg = load_config(path, ["optim.lr.lora=2e-5", "data.batch_size=8", "model.overrides.backbone.grid=4",
                             "data.options.caption_mode=first", "mixed_precision=bf16", "optim.betas=[0.9, 0.95]"])
    assert cfg.steps == 5 and cfg.data.batch_size == 8 and cfg.mixed_precision == "bf16"
    assert cfg.optim.lr["adapter"] == 1e-4 and cfg.optim.lr["lora"] == 2e-5  # "1e-4" from YAML is a number
    assert set(cfg.optim.lr) == set(PARAM_GROUPS)
    assert cfg.model.overrides == {"backbone.grid": 4}
    assert cfg.data.options == {"split": "train", "caption_mode": "first"}
    assert cfg.optim.betas == (0.9, 0.95)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["steps=5", "stepz=3"], "unknown top-level key 'stepz'"),
    (["steps=5", "optim.lr.vision=1"], "unknown parameter groups"),
    (["steps=5", "mixed_precision=fp8"], "mixed_precision must be one of"),
    (["steps=5", "optim.warmup=3"], "unknown keys in optim"),
    (["steps=5", "loss.regulariser=l1"], "loss.regulariser must be one of"),
    (["steps=0"], "steps must be >= 1"),
    ([], "set steps or epochs"),
    (["steps=5", "data.batch_size=0"], "data.batch_size must be >= 1"),
    (["steps=5", "optim.lr.adapter=fast"], "must be numbers"),
    (["steps"], "must look like key.path=value"),
])
def test_bad_config_is_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_parse_value() -> None:
    assert parse_value("1e-4") == 1e-4 and parse_value("3") == 3 and parse_value("null") is None
    assert parse_value("true") is True and parse_value("abc") == "abc" and parse_value("[1, 2]") == [1, 2]


def test_warmup_cosine() -> None:
    f = WarmupCosine(warmup=4, total=14, floor=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert WarmupCosine(0, 10, cosine=False)(7) == 1.0


def test_parameter_groups_cover_every_trained_part(tiny_model) -> None:
    cfg = load_config(None, ["steps=1", "optim.lr.lora=0.5", "optim.weight_decay.adapter=0.1"])
    opt, summary = build_optimizer(tiny_model, cfg.optim)
    trained = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(trained)  # every trained tensor exactly once, no frozen one
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["lora/no_decay"]["lr"] == 0.5
    assert by_name["adapter"]["weight_decay"] == 0.1 and by_name["adapter/no_decay"]["weight_decay"] == 0.0
    names = {group_of(n) for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert names == set(PARAM_GROUPS)
    with pytest.raises(ValueError, match="none of the groups"):
        group_of("backbone.model.weight")
    assert sum(s.params for s in summary) == sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)


def test_optimizer_state_round_trip_without_pickle() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW([{"params": params[:1], "name": "a"}, {"params": params[1:], "name": "b", "lr": 0.1}])
    for _ in range(3):
        (params[0].sum() + params[1].pow(2).sum()).backward()
        opt.step()
    tensors, meta = optimizer_to_files(opt.state_dict())
    meta = json.loads(json.dumps(meta))  # what goes to disk is plain JSON
    restored = torch.optim.AdamW([{"params": [torch.nn.Parameter(p.detach().clone())], "name": n}
                                  for p, n in zip(params, "ab")])
    restored.load_state_dict(optimizer_from_files(tensors, meta))
    a, b = opt.state_dict(), restored.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx in a["state"]:
        for key, value in a["state"][idx].items():
            assert torch.equal(value, b["state"][idx][key])


def test_rng_state_round_trip() -> None:
    tensors, meta = rng_state()
    meta = json.loads(json.dumps(meta))
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(tensors, meta)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_cli_registers_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", str(CONFIGS / "tiny.yaml"), "steps=3", "--resume",
                              "--print-config"])
    assert args.resume == "auto" and args.overrides == ["steps=3"]
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 3 and printed["model"]["name"] == "lexvla-tiny"
    # an override right after a bare --resume is still an override
    args = parser.parse_args(["train", "--resume", "steps=4", "--print-config"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4


def test_backbone_fingerprint_follows_weights_only() -> None:
    """The feature-cache key: same for equal backbones, different when a weight or buffer changes
    (VGG's BatchNorm holds 0-dim buffers, which must hash too)."""
    from lexvla.config import BackboneConfig
    from lexvla.data.cache import backbone_fingerprint
    from lexvla.models.backbones import create_backbone

    cfg = BackboneConfig(name="vgg16bn", source="random", image_size=32, taps=(5,))
    torch.manual_seed(0)
    a = create_backbone(cfg)
    torch.manual_seed(0)
    b = create_backbone(cfg)
    assert backbone_fingerprint(a) == backbone_fingerprint(b)
    with torch.no_grad():
        b.features[1].running_mean[0] += 1.0
    assert backbone_fingerprint(a) != backbone_fingerprint(b)
