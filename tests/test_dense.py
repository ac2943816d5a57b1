"""The dense (CLIP-style) baseline: same encoders, latent outputs, trained by the same trainer and
evaluated by the same eval code."""

from __future__ import annotations

import pytest
import torch

import lexvla
from lexvla.eval import RetrievalConfig, RetrievalDataConfig, evaluate_retrieval, load_retrieval_set
from lexvla.losses import LexVLALoss
from lexvla.models.dense import DenseBaseline
from lexvla.models.zoo import get_config
from test_eval_data import write_karpathy  # tests/ is on sys.path (no package)


@pytest.fixture()
def dense():
    torch.manual_seed(0)
    return DenseBaseline(get_config("lexvla-tiny").replace(**{"text.lora.last_layers": 1}))


def test_dense_outputs_and_gradients(dense):
    m = dense.train()
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    out = m(texts=["a red circle", "a blue square", "a red circle"], pixels=pixels)
    d = m.text.hidden_size
    assert out.image.vectors.shape == (3, d) and out.text.vectors.shape == (3, d)
    torch.testing.assert_close(out.text.vectors.norm(dim=-1), torch.ones(3))
    assert (out.image.vectors < 0).any()  # latent, not lexical: no non-negativity
    LexVLALoss("none")(out.image.vectors, out.text.vectors, out.logit_scale).loss.backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "adapter.text_head.weight" in got and any("lora_B" in n for n in got) and "logit_scale" in got
    assert all("lora_" in n or n.startswith("adapter.") or n == "logit_scale" for n in got), got
    assert not m.visual_codebook.requires_grad and m.visual_codebook.grad is None
    with torch.no_grad():
        patches = m.eval().encode_image(pixels, return_patches=True)
    assert patches.patch_vectors.shape == (3, 16, d) and patches.grid == (4, 4)


def test_dense_save_load_round_trip(dense, tmp_path):
    with torch.no_grad():
        for p in dense.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    dense.eval()
    path = dense.save_pretrained(tmp_path / "dense")
    restored = lexvla.load(path)
    assert isinstance(restored, DenseBaseline)
    with torch.no_grad():
        torch.testing.assert_close(restored.encode_text(["a cat"]).vectors, dense.encode_text(["a cat"]).vectors,
                                   rtol=0, atol=0)
    assert restored.fingerprint() == dense.fingerprint()


def test_dense_is_evaluated_by_the_same_code(dense, tmp_path, monkeypatch):
    monkeypatch.setenv("LEXVLA_CACHE", str(tmp_path / "cache"))
    write_karpathy(tmp_path, "flickr30k", n_test=4)
    data = load_retrieval_set("flickr30k", RetrievalDataConfig(root=tmp_path))
    result = evaluate_retrieval(dense.eval(), data, RetrievalConfig(sparsification="none", progress=False))
    assert result.num_images == 4 and 0.0 <= result.image_to_text.recall[1] <= 1.0
    assert result.active_words["image"] == dense.text.hidden_size  # dense: every dimension is used
