"""LoRA on the LLM's top layers: the split training pass (frozen lower layers computed once per caption)
equals the full pass, one LLM pass per distinct caption, and gradients reach only LoRA / adapter /
visual codebook / temperature."""

import pytest
import torch

import lexvla
from lexvla.losses import LexVLALoss

CAPTIONS = ["a red circle", "a blue square", "a red circle", "two green triangles on a white background"]


@pytest.fixture()
def top_lora():
    torch.manual_seed(0)
    m = lexvla.create_model("lexvla-tiny", **{"text.lora.last_layers": 1})
    with torch.no_grad():  # LoRA B starts at zero: perturb it so the LoRA layers change the output
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def test_lora_only_in_top_layers(top_lora):
    names = [n for n, p in top_lora.named_parameters() if p.requires_grad and "lora_" in n]
    assert names and all(".layers.1." in n for n in names), names
    assert top_lora.text.split == 1


def test_split_pass_equals_full_pass(top_lora):
    top_lora.train()
    split = top_lora.text.scores(CAPTIONS)
    assert len(top_lora.text._prefix) == 3  # distinct captions only
    top_lora.eval()
    with torch.no_grad():
        full = top_lora.text.scores(CAPTIONS)
    torch.testing.assert_close(split.detach(), full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full[0], full[2], atol=0, rtol=0)  # a repeat shares its row


def test_prefix_cache_is_reused(top_lora, monkeypatch):
    top_lora.train()
    top_lora.text.scores(CAPTIONS)
    calls = []
    original = top_lora.text._lower
    monkeypatch.setattr(top_lora.text, "_lower", lambda texts: calls.append(texts) or original(texts))
    top_lora.text.scores(["a red circle", "a cat"])
    assert calls == [["a cat"]]


def test_gradients_reach_only_lora_adapter_codebook(top_lora):
    m = top_lora.train()
    out = m(texts=CAPTIONS, pixels=torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(1)))
    loss = LexVLALoss(image_weight=1e-2, text_weight=1e-2)(out.image.vectors, out.text.vectors, out.logit_scale)
    loss.loss.backward()
    allowed = ("adapter.", "visual_codebook", "logit_scale")
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_" in n for n in got) and "visual_codebook" in got and any(n.startswith("adapter.") for n in got)
    for n in got:
        assert "lora_" in n or n.startswith(allowed), f"{n} got a gradient"
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {n} got a gradient"
    assert m.text.codebook.grad is None
