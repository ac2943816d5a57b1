"""Tiny random VLMs (the real code paths): SmallVLM and HF LLaVA with CAL, two-stage training with
resume, label noise, and the ``lexvla cal`` commands."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lexvla.cal import CALConfig, CALLoss, HFLlavaVLM, SmallVLM, VLMConfig
from lexvla.cal.data import VLMExample, answer_kind, compute_features, inject_label_noise
from lexvla.cal.train import TrainConfig, batch_indices, evaluate_vqa, train_stage
from lexvla.config import BackboneConfig

TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}


def tiny_config(**kw) -> VLMConfig:
    bb = BackboneConfig(name="vgg16bn", source="random", image_size=32, taps=(5, 12))
    return VLMConfig(backbone=bb, llm="random", llm_arch=TINY_LLAMA, **kw)


@pytest.fixture(scope="module")
def parts():
    """Tokenizer and random backbone built once (they are frozen; only the LLM/projector are fresh)."""
    from lexvla.models.backbones import create_backbone
    from lexvla.models.text import load_tokenizer

    cfg = tiny_config()
    return load_tokenizer(cfg.tokenizer), create_backbone(cfg.backbone)


def make_vlm(parts, **kw) -> SmallVLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, backbone = parts
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **TINY_LLAMA))
    return SmallVLM(tiny_config(**kw), llm=llm, tokenizer=tok, backbone=backbone)


@pytest.fixture(scope="module")
def vlm(parts) -> SmallVLM:
    return make_vlm(parts)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0), (128, 128, 128)]):
        arr = np.full((32, 32, 3), 240, dtype=np.uint8)
        arr[8:24, 8:24] = colour
        path = folder / f"{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(str(path))
    return paths


def batch(vlm: SmallVLM, n: int = 3):
    feats = vlm.image_features(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    questions = ["what color is the shape?", "is there a red circle in the image?", "what shape?"][:n]
    tokens = vlm.tokenize(vlm.vqa_prompts(questions), [" red", " no", " circle"][:n])
    return tokens, feats


def test_tokenize_layout(vlm):
    tokens, _ = batch(vlm)
    assert tokens.image_mask.sum(1).tolist() == [vlm.config.image_tokens] * 3
    # left padding: every target (answer + EOS) ends at the last position
    assert bool((tokens.labels[:, -1] == vlm.tokenizer.eos_token_id).all())
    assert bool((tokens.labels[tokens.image_mask] == -100).all())
    lens = tokens.attention_mask.sum(1)
    assert tokens.position_ids[torch.arange(3), -1].tolist() == (lens - 1).tolist()


@pytest.mark.parametrize("condition", ["remove", "mask_patches", "blur"])
def test_small_vlm_forward_backward_with_cal(vlm, condition):
    vlm.set_stage("pretrain")
    tokens, feats = batch(vlm)
    pixels = torch.randn(3, 3, 32, 32)
    feats = vlm.image_features(pixels)
    blurred = vlm.blurred_features(pixels, 2.0) if condition == "blur" else None
    vlm.zero_grad(set_to_none=True)
    out = CALLoss(CALConfig(condition=condition))(vlm.logits, vlm.multimodal_inputs(tokens, feats, blurred))
    assert torch.isfinite(out.loss) and torch.isfinite(out.logit_diff).all()
    assert out.num_tokens == 6  # answer + EOS for each of 3 examples
    out.loss.backward()
    assert vlm.projector.fc1.weight.grad is not None and vlm.projector.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vlm.llm.parameters())  # stage 1: the LLM stays frozen


def test_image_first_sequence_stays_finite(parts):
    # the image at position 0: removing it leaves rows with nothing to attend to
    vlm = make_vlm(parts, prompt="<image>{question}", caption_prompt="<image>")
    tokens, feats = batch(vlm)
    out = CALLoss()(vlm.logits, vlm.multimodal_inputs(tokens, feats), crop=False)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logit_diff).all()


def test_finetune_trains_lora_and_checkpoint_roundtrip(tmp_path, parts):
    vlm = make_vlm(parts)
    vlm.set_stage("finetune")
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in vlm.named_parameters():
            if "lora_B" in n:
                p.normal_()  # LoRA B starts at zero; make the adapter matter for the round trip
    tokens, feats = batch(vlm)
    inp = vlm.multimodal_inputs(tokens, feats)
    before = vlm.logits(inp.inputs_embeds, inp.attention_mask, inp.position_ids, 3)
    vlm.save_pretrained(tmp_path / "ckpt")
    again = SmallVLM.from_pretrained(tmp_path / "ckpt")
    inp2 = again.multimodal_inputs(tokens, feats)
    after = again.logits(inp2.inputs_embeds, inp2.attention_mask, inp2.position_ids, 3)
    assert torch.allclose(before, after, atol=1e-5)


def test_hf_llava_tiny_config_with_cal():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=64, **TINY_LLAMA)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=63, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    n_img = (16 // 8) ** 2  # "default" strategy drops CLS: one token per patch
    ids = torch.tensor([[0, 0, 5] + [63] * n_img + [7, 8, 9, 10], [3, 4, 5] + [63] * n_img + [7, 8, 11, 12]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = ids.clone()
    labels[:, : 3 + n_img + 1] = -100
    wrapper = HFLlavaVLM(model)
    pixels = torch.randn(2, 3, 16, 16)
    inputs = wrapper.multimodal_inputs(ids, mask, labels, pixels)
    assert int(inputs.image_mask.sum()) == 2 * n_img
    # the merged embeddings reproduce LLaVA's own forward
    ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=inputs.position_ids).logits
    ours = wrapper.logits(inputs.inputs_embeds, mask, inputs.position_ids)
    assert torch.allclose(ref, ours, atol=1e-5)
    out = CALLoss()(wrapper.logits, inputs)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None


def test_label_noise_is_exact_nested_and_same_kind():
    clean = [VLMExample(f"{i}.png", a, "q?") for i, a in enumerate(["yes", "no", "red", "circle", "blue"] * 20)]
    n20 = inject_label_noise(clean, 0.2, seed=3)
    n40 = inject_label_noise(clean, 0.4, seed=3)
    assert sum(e.noisy for e in n20) == 20 and sum(e.noisy for e in n40) == 40
    noisy20 = {i for i, e in enumerate(n20) if e.noisy}
    noisy40 = {i for i, e in enumerate(n40) if e.noisy}
    assert noisy20 <= noisy40
    for e in n40:
        if e.noisy:
            assert e.target != e.clean_target and answer_kind(e.target) == answer_kind(e.clean_target)
    assert inject_label_noise(clean, 0.0) == clean


def test_batch_indices_cover_each_epoch_once():
    seen = [i for s in range(5) for i in batch_indices(10, 4, s, seed=1)]
    assert sorted(seen[:10]) == list(range(10))  # first epoch = a permutation
    assert batch_indices(10, 4, 3, seed=1) == batch_indices(10, 4, 3, seed=1)


def test_two_stage_training_resume_and_eval(tmp_path, images, parts):
    captions = [VLMExample(p, c) for p, c in zip(images, ["a red square", "a blue square", "a green square",
                                                          "a gray square"], strict=True)]
    vqa = [VLMExample(p, a, "what color is the shape?") for p, a in zip(images, ["red", "blue", "green", "gray"],
                                                                       strict=True)]
    vlm = make_vlm(parts)
    feats = compute_features(vlm.backbone, images, cache=tmp_path / "feats")
    assert (tmp_path / "feats").is_dir() and compute_features(vlm.backbone, images, cache=tmp_path / "feats")
    s1 = train_stage(vlm, captions, feats, TrainConfig(stage="pretrain", steps=2, batch_size=2, log_every=1,
                                                       progress=False), tmp_path / "s1")
    assert (s1.checkpoint / "trainable.safetensors").is_file()
    cfg = TrainConfig(stage="finetune", steps=4, batch_size=2, log_every=1, save_every=2, progress=False)

    from safetensors.torch import load_file

    def fresh():
        m = make_vlm(parts)
        m.load_trainable(load_file(s1.checkpoint / "trainable.safetensors"))
        return m

    straight = fresh()
    train_stage(straight, vqa, feats, cfg, tmp_path / "straight")
    # an interrupted run: stop after step 2, then resume from its checkpoint to step 4
    part = fresh()
    train_stage(part, vqa, feats, TrainConfig(**{**cfg.__dict__, "steps": 2}), tmp_path / "resumed")
    resumed = fresh()
    train_stage(resumed, vqa, feats, cfg, tmp_path / "resumed")
    a, b = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all("weight_mean" in r for r in lines)
    ev = evaluate_vqa(resumed, vqa, feats, ["red", "blue", "green", "gray"])
    assert ev.n == 4 and 0.0 <= ev.accuracy <= 1.0


def _run_cli(argv: list[str]) -> int:
    from lexvla.cal.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_inspect_writes_heat_map(tmp_path, images, capsys, parts):
    make_vlm(parts).save_pretrained(tmp_path / "ckpt")
    rc = _run_cli(["cal", "inspect", "--checkpoint", str(tmp_path / "ckpt"), "--image", images[0],
                   "--text", "a red square", "--text", "a blue circle", "--out", str(tmp_path / "heat")])
    assert rc == 0
    html = (tmp_path / "heat.html").read_text()
    assert "red" in html and "circle" in html and "data:image/png;base64," in html
    assert Image.open(tmp_path / "heat.png").size[0] > 300
    assert "red:" in capsys.readouterr().out
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": p, "caption": c}) for p, c in
                                  zip(images, ["a red square", "a blue square", "a cat", "a gray square"],
                                      strict=True)))
    rc = _run_cli(["cal", "inspect", "--checkpoint", str(tmp_path / "ckpt"), "--manifest", str(manifest),
                   "--top", "2", "--out", str(tmp_path / "rank")])
    rows = [json.loads(x) for x in (tmp_path / "rank.jsonl").read_text().splitlines()]
    assert rc == 0 and len(rows) == 4
    assert [r["score"] for r in rows] == sorted(r["score"] for r in rows)  # most contradicted word first
    assert all(r["most_contradicted_word"] != "a" for r in rows)  # function words are never scored


def test_experiment_helpers_and_report(tmp_path):
    from lexvla.cal.experiment import ExperimentConfig, caption_examples, question_only_accuracy, write_report

    qa = [VLMExample("a.png", "red", "what color is the shape?"), VLMExample("a.png", "circle", "what shape is present?"),
          VLMExample("b.png", "triangle", "what is the blue shape?"), VLMExample("c.png", "no", "is there a circle?")]
    assert caption_examples(qa) == [VLMExample("a.png", "a red circle"), VLMExample("b.png", "a blue triangle")]
    test = [VLMExample("d.png", "red", "what color is the shape?"), VLMExample("d.png", "yes", "is there a circle?")]
    assert question_only_accuracy(qa, test) == 0.5
    with pytest.raises(ValueError, match="answer_kinds"):
        ExperimentConfig(answer_kinds=("size",))
    runs = [{"noise": n, "cal": c, "accuracy": 0.5 + 0.1 * c - n} for n in (0.0, 0.4) for c in (False, True)]
    write_report({"runs": runs, "question_only_accuracy": 0.2, "total_seconds": 60}, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "| 40% | 0.100 | 0.200 | +0.100 |" in table
    assert (tmp_path / "accuracy_vs_noise.png").stat().st_size > 1000
