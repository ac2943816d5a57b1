"""The model library on tiny random models of the real architectures (DINOv2, Llama)."""

import math

import pytest
import torch
from PIL import Image

import lexvla
from lexvla._assets import AssetNotFoundError
from lexvla.losses import LexVLALoss


def _images(n, size=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_public_api_shapes(tiny_model):
    m = tiny_model
    with torch.no_grad():
        img = m.encode_image(_images(3), return_patches=True)
        txt = m.encode_text(["a red circle", "a blue square"])
    V = len(m.vocab)
    assert img.vectors.shape == (3, V) and txt.vectors.shape == (2, V)
    assert img.patch_vectors.shape == (3, 16, V) and img.grid == (4, 4)
    for out in (img, txt):
        assert (out.vectors >= 0).all()
        torch.testing.assert_close(out.vectors.norm(dim=-1), torch.ones(len(out)))
    assert m.similarity(img, txt).shape == (3, 2)
    words = m.top_words(txt, k=5)
    assert len(words) == 2 and all(len(w) == 5 and all(isinstance(s, float) for _, s in w) for w in words)


def test_encode_image_from_files_and_batches(tiny_model, tmp_path):
    from PIL import Image

    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (30 + i, 20), (40 * i, 10, 200)).save(p)
        paths.append(p)
    with torch.no_grad():
        a = tiny_model.encode_image(paths, batch_size=2)
        b = tiny_model.encode_image(tiny_model.preprocess(paths))
    torch.testing.assert_close(a.vectors, b.vectors)


def test_text_is_padding_invariant(tiny_model):
    """Left padding with real-token positions: a caption's vector does not depend on its batch."""
    with torch.no_grad():
        alone = tiny_model.encode_text(["a cat"]).vectors
        batched = tiny_model.encode_text(["a cat", "a much longer caption about a dog on a sunny beach"]).vectors
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-4)


def test_only_trainable_parameters_get_gradients_and_frozen_parts_stay_identical():
    torch.manual_seed(0)
    m = lexvla.create_model("lexvla-tiny").train()
    frozen_before = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    codebook_before = m.text.codebook.clone()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and "visual_codebook" in trainable
    assert not any(n.startswith("backbone.") for n in trainable)
    assert not any("lora_" not in n and n.startswith("text.") for n in trainable)

    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    out = m(texts=["a red circle", "a blue square", "a green triangle"], pixels=_images(3))
    loss = LexVLALoss(image_weight=1e-3, text_weight=1e-3)(out.image.vectors, out.text.vectors, out.logit_scale)
    loss.loss.backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} got no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    # LoRA B starts at zero, so LoRA A gets zero grads on step one; everything else must move.
    opt.step()
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"
    assert torch.equal(m.text.codebook, codebook_before)
    assert not torch.equal(m.visual_codebook, codebook_before)


def test_save_load_round_trip_identical(tmp_path):
    torch.manual_seed(0)
    m = lexvla.create_model("lexvla-tiny")
    with torch.no_grad():  # perturb every trained tensor so the test sees whether they are restored
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    m.eval()
    path = m.save_pretrained(tmp_path / "ckpt")
    assert sorted(f.name for f in path.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    restored = lexvla.load(path)
    x, texts = _images(2, seed=3), ["a red circle", "two dogs"]
    with torch.no_grad():
        torch.testing.assert_close(restored.encode_image(x).vectors, m.encode_image(x).vectors, rtol=0, atol=0)
        torch.testing.assert_close(restored.encode_text(texts).vectors, m.encode_text(texts).vectors, rtol=0, atol=0)
    assert restored.fingerprint() == m.fingerprint()
    assert lexvla.create_model(path).fingerprint() == m.fingerprint()


def test_checkpoint_holds_only_trained_tensors(tmp_path, tiny_model):
    from safetensors.torch import load_file

    path = tiny_model.save_pretrained(tmp_path / "c")
    saved = load_file(path / "model.safetensors")
    assert set(saved) == {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert not any(k.startswith("backbone.") or k == "text.codebook" for k in saved)


def test_load_rejects_incomplete_checkpoint(tmp_path, tiny_model):
    path = tiny_model.save_pretrained(tmp_path / "c")
    (path / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        lexvla.load(path)


def test_missing_weight_source_gives_one_clear_error():
    with pytest.raises(AssetNotFoundError, match="local Hugging Face model folder"):
        lexvla.create_model("lexvla-tiny", **{"text.source": "/nonexistent/llama-2-7b"})
    with pytest.raises(AssetNotFoundError, match="DINOv2"):
        lexvla.create_model("lexvla-tiny", **{"backbone.source": "no-such-org/dinov2-base"})


def test_unknown_names_are_clear():
    with pytest.raises(ValueError, match="unknown model"):
        lexvla.create_model("lexvla-huge")
    with pytest.raises(KeyError, match="unknown config key"):
        lexvla.create_model("lexvla-tiny", **{"backbone.nope": 1})


def test_backbone_is_frozen_in_train_mode(tiny_model):
    tiny_model.train()
    assert not tiny_model.backbone.training
    tiny_model.eval()


def test_multi_depth_vgg_taps_concatenate():
    from lexvla.config import BackboneConfig
    from lexvla.models.backbones import create_backbone

    b = create_backbone(BackboneConfig(name="vgg16bn", source="random", image_size=64, taps=(12, 22, 39), grid=2))
    assert b.embed_dim == 128 + 256 + 512
    assert b(torch.randn(2, 3, 64, 64)).shape == (2, 4, 896)
    with pytest.raises(ValueError, match="taps"):
        create_backbone(BackboneConfig(name="vgg16bn", source="embedded", taps=(42,)))


def test_temperature_initialisation(tiny_model):
    assert math.isclose(float(tiny_model.logit_scale.detach().exp()), 1 / 0.07, rel_tol=1e-5)


def test_untrained_zoo_model_is_deterministic_and_leaves_global_rng_alone(tiny_model):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    again = lexvla.create_model("lexvla-tiny")
    assert torch.equal(torch.rand(1), expected)  # construction did not consume the caller's RNG
    assert again.fingerprint() == tiny_model.fingerprint()


def test_long_caption_is_cut_but_the_prompt_ending_stays(tiny_model):
    text = tiny_model.text
    long_caption = " ".join(["word"] * 500)
    batch = text.tokenize([long_caption])
    assert batch["input_ids"].shape[1] <= text.cfg.max_length
    decoded = text.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert decoded.rstrip().endswith('means in one word:')


def test_encoding_keeps_no_autograd_graph_unless_asked(tiny_model):
    """encode_image / encode_text / similarity run under inference mode (a big set holds no graphs);
    grad=True keeps gradients, and forward (training) always does."""
    img = tiny_model.encode_image(_images(2), return_patches=True)
    txt = tiny_model.encode_text(["a red circle", "a blue square"])
    sim = tiny_model.similarity(img, txt)
    for t in (img.vectors, img.patch_vectors, txt.vectors, sim):
        assert t.grad_fn is None and not t.requires_grad
    assert tiny_model.encode_text(["a cat"], grad=True).vectors.requires_grad
    assert tiny_model.encode_image(_images(1), grad=True).vectors.requires_grad
    out = tiny_model(texts=["a cat", "a dog"], pixels=_images(2))
    assert out.image.vectors.requires_grad and out.text.vectors.grad_fn is not None


def test_backbone_at_image_size_keeps_the_patch_stride():
    """A 64 px VGG with a 4x4 grid encodes 224 px on 14x14 patches of 16 px; sizes that break the
    stride are refused, and the configured size is restored after the block."""
    from lexvla.config import BackboneConfig
    from lexvla.models.backbones import create_backbone

    bb = create_backbone(BackboneConfig(name="vgg16bn", source="random", image_size=64, taps=(12, 22), grid=4))
    with bb.at_image_size(224):
        pixels = bb.preprocess([Image.new("RGB", (50, 30), "red")])
        tokens = bb(pixels)
        assert pixels.shape[-2:] == (224, 224) and bb.grid == (14, 14) and tokens.shape == (1, 196, bb.embed_dim)
    assert bb.grid == (4, 4) and bb.preprocess.image_size == 64
    with pytest.raises(ValueError, match="multiple of 16 px"):
        bb.scaled_grid(100)


def test_adapter_local_attention_keeps_far_patches_out():
    from lexvla.config import AdapterConfig
    from lexvla.models.vision import Adapter

    a = Adapter(8, 6, AdapterConfig(width=8, heads=2)).eval()
    x = torch.randn(1, 36, 8)  # a 6x6 grid
    y = a(x)
    x2 = x.clone()
    x2[0, 35] = torch.randn(8)  # bottom-right patch
    with a.local_attention(1):
        near, local = a(x2), a(x)
    assert torch.equal(near[0, 0], local[0, 0])  # (0, 0) is 5 rows away: unaffected
    assert not torch.allclose(near[0, 28], local[0, 28])  # (4, 4) is its neighbour
    assert a.window is None and torch.equal(a(x), y)  # restored: all patches attend again
    with a.local_attention(5):  # spans the whole grid: the trained adapter exactly
        assert torch.equal(a(x), y)
