"""Concept captions, caption-noise injection, the noisy-token finder and the caption-noise experiment
(tiny random models and generated concepts)."""

from __future__ import annotations

import json

import pytest

from lexvla.cal.captions import (
    FUNCTION_WORDS,
    CaptionExample,
    Concept,
    caption_slots,
    inject_caption_noise,
    read_concepts,
    render_caption,
    text_words,
    token_words,
    write_fixture_concepts,
)
from lexvla.cal.finder import FinderConfig, roc_auc, roc_curve, score_caption, score_tokens

CONCEPTS = [Concept("red apple", ("apple", "fruit", "food", "red")), Concept("dog face", ("dog", "pet", "animal")),
            Concept("fish cake with swirl", ("pastry", "food", "swirl")), Concept("rocket", ("space", "launch")),
            Concept("ship", ("boat", "sea")), Concept("sun", ("bright", "weather"))]


def captions(n_per: int = 5) -> list[CaptionExample]:
    return [CaptionExample(f"{c.name}-{i}.png", c.name, caption_slots(c)) for c in CONCEPTS for i in range(n_per)]


def test_caption_slots_and_words():
    assert caption_slots(CONCEPTS[0]) == ("red apple", "fruit", "food")  # name words are not keywords
    cap = CaptionExample("x.png", "fish cake with swirl", caption_slots(CONCEPTS[2]))
    assert cap.text == "fish cake with swirl: pastry, food" == render_caption(cap.slots)
    words = cap.words()
    assert [w.text for w in words] == ["fish", "cake", "with", "swirl", "pastry", "food"]
    assert [w.content for w in words] == [True, True, False, True, True, True]
    assert all(cap.text[w.start:w.end] == w.text for w in words)
    assert not cap.noisy and not any(w.injected for w in words)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 1.0])
def test_injection_mixed_exact_share_only_content_slots(rate):
    clean = captions()
    noisy = inject_caption_noise(clean, rate, CONCEPTS, seed=3, slots_replaced=2)
    changed = [(a, b) for a, b in zip(clean, noisy, strict=True) if a != b]
    assert len(changed) == sum(b.noisy for b in noisy) == round(rate * len(clean))
    names = {c.name: c for c in CONCEPTS}
    for a, b in changed:
        assert b.injected == (True, True, False)  # the name and the first keyword, never the rest
        assert b.slots[2] == a.slots[2] and b.clean_slots == a.slots and b.clean_text == a.text
        src = caption_slots(names[b.source])
        assert b.source != a.concept and b.slots[:2] == src[:2]
        # the template (separators) is kept: only slot values change
        assert b.text == f"{b.slots[0]}: {b.slots[1]}, {b.slots[2]}"
        # injected content words really contradict the image: none of them is in the clean caption
        clean_words = {w.text for w in a.words() if w.content}
        injected = [w for w in b.words() if w.injected]
        assert injected and all(w.text not in clean_words for w in injected if w.content)
        # words outside the injected slots keep their flags false
        assert [w.text for w in b.words() if not w.injected] == [w.text for w in a.words()][-1:]
        assert all(not w.content for w in injected if w.text.lower() in FUNCTION_WORDS)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 1.0])
def test_fluent_injection_exact_share_reads_as_another_concepts_caption(rate):
    clean = captions()
    noisy = inject_caption_noise(clean, rate, CONCEPTS, seed=3)  # default: fluent, every slot
    changed = [(a, b) for a, b in zip(clean, noisy, strict=True) if a != b]
    assert len(changed) == sum(b.noisy for b in noisy) == round(rate * len(clean))
    names = {c.name: c for c in CONCEPTS}
    own_captions = {render_caption(caption_slots(c)) for c in CONCEPTS}
    for a, b in changed:
        # fluent: the whole caption is the source concept's own caption, nothing of the clean one is left
        assert b.source != a.concept and b.slots == caption_slots(names[b.source]) and b.text in own_captions
        assert b.injected == (True,) * len(a.slots) and b.clean_text == a.text
        # the template is kept: the text outside the words (separators) is the same
        assert _skeleton(b) == _skeleton(a)
        # every content word changed and contradicts the image; only names carry function words along
        clean_words = {w.text.lower() for w in a.words() if w.content}
        injected = b.words()
        assert all(w.injected for w in injected)
        assert all(w.text.lower() not in clean_words for w in injected if w.content)
        assert all(w.text.lower() in FUNCTION_WORDS for w in injected if not w.content)
        assert all(not w.content for w in injected if w.text.lower() in FUNCTION_WORDS)
    # a text-only model sees nothing odd: every noisy caption is a clean caption of some concept
    assert {b.text for _, b in changed} <= {a.text for a in clean}


def _skeleton(cap: CaptionExample) -> list[str]:
    """The caption's text between its slot values (found in order in the text): the template's part."""
    out, pos = [], 0
    for value in cap.slots:
        at = cap.text.index(value, pos)
        out.append(cap.text[pos:at])
        pos = at + len(value)
    return out + [cap.text[pos:]]


def test_fluent_injection_needs_a_source_with_as_many_slots():
    short = [Concept("red apple", ("fruit",)), Concept("dog face", ("pet", "animal")), Concept("ship", ("boat", "sea"))]
    caps = [CaptionExample("a.png", "red apple", caption_slots(short[0]))]  # 2 slots; no other concept has 2
    with pytest.raises(ValueError, match="as many slots"):
        inject_caption_noise(caps, 1.0, short, seed=0)
    assert inject_caption_noise(caps, 1.0, short, seed=0, slots_replaced=1)[0].noisy


def test_injection_nested_and_validated():
    clean = captions()
    low, high = (inject_caption_noise(clean, r, CONCEPTS, seed=1) for r in (0.2, 0.4))
    low_idx = {i for i, c in enumerate(low) if c.noisy}
    high_idx = {i for i, c in enumerate(high) if c.noisy}
    assert low_idx < high_idx
    assert all(low[i] == high[i] for i in low_idx)  # same replacement at both rates
    assert inject_caption_noise(clean, 0.4, CONCEPTS, seed=1) == high
    assert inject_caption_noise(clean, 0.4, CONCEPTS, seed=2) != high
    with pytest.raises(ValueError, match="rate"):
        inject_caption_noise(clean, 1.5, CONCEPTS)
    with pytest.raises(ValueError, match="two concepts"):
        inject_caption_noise(clean, 0.5, CONCEPTS[:1])
    with pytest.raises(ValueError, match="slots_replaced"):
        inject_caption_noise(clean, 0.5, CONCEPTS, slots_replaced=0)


def test_training_record_keeps_clean_caption():
    noisy = inject_caption_noise(captions(), 1.0, CONCEPTS, seed=0)[0]
    ex = noisy.to_vlm_example()
    assert ex.target == noisy.text and ex.clean_target == noisy.clean_text and ex.noisy and ex.question is None


def test_token_words_align_with_tokenizer():
    from lexvla.models.text import load_tokenizer

    tok = load_tokenizer("embedded:smollm2")
    cap = CaptionExample("x.png", "fish cake with swirl", caption_slots(CONCEPTS[2]))
    ids, word_of = token_words(tok, cap.text, cap.words())
    assert ids == tok(" " + cap.text, add_special_tokens=False).input_ids
    pieces = [tok.decode([i]).strip() for i in ids]
    words = cap.words()
    for piece, w in zip(pieces, word_of, strict=True):
        if w is None:
            assert piece in (":", ",")
        else:
            assert piece in words[w].text
    assert {w for w in word_of if w is not None} == set(range(len(words)))


def test_finder_scores_hand_made_case():
    # " red"(0) " ap"(1) "ple"(1) ":"(-) " of"(2, function word) " car"(3) ","(-)
    values = [2.0, 1.5, -1.0, 0.4, 0.6, -3.0, 0.2]
    token_word = [0, 1, 1, None, 2, 3, None]
    content = [True, True, False, True]
    nll = [1.0, 2.0, 3.0, 0.5, 0.5, 4.0, 1.0]
    sc = score_caption(values, token_word, content, nll, "function")
    ref = (0.4 + 0.6 + 0.2) / 3  # separators and the function word
    assert sc.token_scores == pytest.approx([2.0 - ref, 1.5 - ref, -1.0 - ref, None, None, -3.0 - ref, None])
    assert sc.word_scores == pytest.approx({0: 2.0 - ref, 1: -1.0 - ref, 3: -3.0 - ref})  # word = min of its tokens
    assert sc.worst_word == 3 and sc.score == pytest.approx(-3.0 - ref)
    assert sc.ce == pytest.approx(12.0 / 7)
    assert score_caption(values, token_word, content, nll, "none").score == pytest.approx(-3.0)
    # median over content tokens: 2.0, 1.5, -1.0, -3.0 -> 0.25
    assert score_tokens(values, [True, True, True, False, False, True, False], "median")[0] == pytest.approx(1.75)
    assert score_caption([1.0], [None], [], [1.0]).worst_word is None  # nothing to score
    with pytest.raises(ValueError, match="signal"):
        FinderConfig(signal="entropy")


def test_roc_auc_hand_made():
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [True, False, True, False]) == pytest.approx(0.75)
    assert roc_auc([1.0, 1.0], [True, False]) == pytest.approx(0.5)  # a tie counts half
    assert roc_auc([3, 2, 1], [True, True, False]) == 1.0
    fpr, tpr = roc_curve([0.9, 0.8, 0.3, 0.1], [True, False, True, False])
    assert fpr == [0.0, 0.0, 0.5, 0.5, 1.0] and tpr == [0.0, 0.5, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="both"):
        roc_auc([1.0, 2.0], [True, True])


def test_find_noisy_uses_pmi_of_content_tokens():
    from lexvla.cal.inspect import TokenCorrelation, find_noisy
    from lexvla.models.text import load_tokenizer

    tok = load_tokenizer("embedded:smollm2")
    text = "red apple: fruit, car"
    ids = tok(" " + text, add_special_tokens=False).input_ids
    n = len(ids)
    word_of = token_words(tok, text)[1]
    car = word_of.index(3)  # the token of "car" (word 3)
    lp_text = [-2.0] * n
    lp = [-1.0 if w not in (None, 3) else -2.0 for w in word_of]  # the image raises every word but "car"...
    lp[car] = -6.0  # ...and lowers "car"
    row = TokenCorrelation(text, [tok.decode([i]) for i in ids], [10.0] * n, ids, lp, lp_text)
    sc = find_noisy(row, tok)
    assert sc.worst_word == 3 and sc.score == pytest.approx(-4.0)
    assert [s is None for s in sc.token_scores] == [w is None for w in word_of]
    raw = find_noisy(row, tok, config=FinderConfig(signal="logit_diff"))
    assert raw.score == pytest.approx(0.0)  # the raw logit difference is flat here: nothing stands out
    assert [w.text for w in text_words(text)] == ["red", "apple", "fruit", "car"]


def test_fixture_concepts_round_trip(tmp_path):
    path = write_fixture_concepts(tmp_path, n=6)
    concepts = read_concepts(path)
    assert len(concepts) == 6 and all(c.images and len(caption_slots(c)) == 3 for c in concepts)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"name": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        read_concepts(bad)


def test_caption_experiment_tiny(tmp_path):
    from lexvla.cal.caption_experiment import CaptionExperimentConfig, run_caption_experiment

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    cfg = CaptionExperimentConfig(concepts="fixture", n_concepts=6, train_views=2, test_views=2, val_views=1, llm="random",
                                  llm_arch=tiny, steps=2, batch_size=4, seeds=(0,), noise_rates=(0.0, 0.5),
                                  image_size=32)
    res = run_caption_experiment(cfg, tmp_path)
    assert len(res["runs"]) == 4
    assert {(r["noise"], r["cal"]) for r in res["runs"]} == {(0.0, False), (0.0, True), (0.5, False), (0.5, True)}
    assert [r["noisy_train_captions"] for r in res["runs"]] == [0, 0, 6, 6]  # exactly half of 12 captions
    for r in res["runs"]:
        assert 0 <= r["retrieval"]["likelihood_top1"] <= 1 and 0 < r["retrieval"]["likelihood_mrr"] <= 1
        assert set(r["caption_auc"]) >= {"pmi/function", "pmi/none", "ce", "ce_text", "min_raw_diff"}
        assert set(r["caption_auc_val"]) == set(r["caption_auc"])  # every variant on both splits
        assert len(r["test_scores"]["pmi/none"]) == len(r["test_labels"]) == 6 and sum(r["test_labels"]) == 3
    heldout = [json.loads(x) for x in (tmp_path / "seed0" / "heldout.jsonl").read_text().splitlines()]
    assert sum(h["noisy"] for h in heldout) == 6 and len(heldout) == 12
    # each split holds exactly its share, and a noisy held-out caption is another concept's own caption
    for part in ("val", "test"):
        assert sum(h["noisy"] for h in heldout if h["split"] == part) == 3
    assert all(h["source"] != h["concept"] and h["caption"].startswith(h["source"] + ":")
               for h in heldout if h["noisy"])
    md = (tmp_path / "results.md").read_text()
    assert "| 50% |" in md and "finder, captions" in md and "(chosen)" in md and "text-only CE" in md
    from lexvla.cal.caption_experiment import select_finder

    chosen = select_finder(res["runs"])  # by the validation split only
    val = {n: sum(r["caption_auc_val"][n] for r in res["runs"]) for n in res["runs"][0]["caption_auc_val"]
           if "/" in n}
    assert val[chosen] == max(val.values())
    assert (tmp_path / "retrieval_vs_noise.png").stat().st_size > 1000
    assert (tmp_path / "finder_roc.png").stat().st_size > 1000
    # inspect's batch mode on the held-out manifest: ranked by the finder, AUC from the 'noisy' labels
    import argparse

    from lexvla.cal.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    ckpt = res["runs"][-1]["checkpoint"]
    args = parser.parse_args(["cal", "inspect", "--checkpoint", ckpt, "--manifest", str(tmp_path / "seed0" / "heldout.jsonl"),
                              "--top", "3", "--out", str(tmp_path / "ranked")])
    assert args.func(args) == 0
    ranked = [json.loads(x) for x in (tmp_path / "ranked.jsonl").read_text().splitlines()]
    assert len(ranked) == 12 and [r["score"] for r in ranked] == sorted(r["score"] for r in ranked)
    assert sum(r["noisy"] for r in ranked) == 6
    assert all(len(r["finder_scores"]) == len(r["tokens"]) for r in ranked)
    html = (tmp_path / "ranked.html").read_text()
    assert "most contradicted" in html and "centred at zero" in html
    # the marginal over reference images (the manifest's own by default) as the text-only expectation
    args = parser.parse_args(["cal", "inspect", "--checkpoint", ckpt, "--manifest", str(tmp_path / "seed0" / "heldout.jsonl"),
                              "--signal", "pmi_marginal", "--reference-images", "4", "--out", str(tmp_path / "ranked_m")])
    assert args.func(args) == 0
    ranked_m = [json.loads(x) for x in (tmp_path / "ranked_m.jsonl").read_text().splitlines()]
    assert len(ranked_m) == 12 and [r["score"] for r in ranked_m] == sorted(r["score"] for r in ranked_m)
    assert [r["score"] for r in ranked_m] != [r["score"] for r in ranked]
    image = str((tmp_path / "seed0" / heldout[0]["image"]).resolve())
    single = ["cal", "inspect", "--checkpoint", ckpt, "--image", image, "--text", heldout[0]["caption"],
              "--signal", "pmi_marginal", "--out", str(tmp_path / "single_m")]
    with pytest.raises(ValueError, match="needs --reference"):
        parser.parse_args(single).func(parser.parse_args(single))
    args = parser.parse_args(single + ["--reference", str(tmp_path / "seed0" / "heldout.jsonl")])
    assert args.func(args) == 0 and (tmp_path / "single_m.png").stat().st_size > 1000
    # seeds run as separate processes merge into one report
    from lexvla.cal.caption_experiment import merge_results, write_caption_report

    other = json.loads((tmp_path / "results.json").read_text())
    for r in other["runs"]:
        r["seed"] = 7
    other["seeds"] = {"7": other["seeds"]["0"]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="already merged"):
        merge_results([tmp_path / "results.json", tmp_path / "results.json"])
    merged = merge_results([tmp_path / "results.json", tmp_path / "other.json"])
    assert len(merged["runs"]) == 8 and merged["config"]["seeds"] == [0, 7]
    (tmp_path / "merged").mkdir()
    write_caption_report(merged, tmp_path / "merged")
    assert "Seeds: 0, 7" in (tmp_path / "merged" / "results.md").read_text()


def test_marginal_logprobs_is_the_reference_images_mixture():
    import math

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lexvla.cal.inspect import marginal_logprobs, reference_features, target_logprobs
    from lexvla.cal.vlm import SmallVLM, VLMConfig
    from lexvla.config import BackboneConfig
    from lexvla.models.text import load_tokenizer

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    cfg = VLMConfig(backbone=BackboneConfig(name="vgg16bn", source="random", image_size=32, taps=(5, 12)),
                    llm="random", llm_arch=tiny)
    tok = load_tokenizer(cfg.tokenizer)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **tiny))
    vlm = SmallVLM(cfg, llm=llm, tokenizer=tok)
    ref = torch.randn(3, 4, vlm.backbone.embed_dim) * 3
    text = "red apple: fruit, food"
    per = target_logprobs(vlm, ref, [text] * 3)
    marg = marginal_logprobs(vlm, ref, [text, text], batch_size=2)
    assert list(marg) == [text] and len(marg[text]) == len(per[0])
    # every prefix's marginal likelihood is the mean of its likelihoods under the reference images
    for t in range(1, len(per[0]) + 1):
        mix = math.log(sum(math.exp(sum(p[:t])) for p in per) / 3)
        assert sum(marg[text][:t]) == pytest.approx(mix, abs=1e-4)
    assert per[0] != per[1]  # the images matter, so the mixture is not any one of them
    # one reference image: the marginal is that image's own prediction
    assert marginal_logprobs(vlm, ref[:1], [text])[text] == pytest.approx(per[0], abs=1e-5)
    feats = {f"{i}.png": ref[i] for i in range(3)}
    assert reference_features(feats, k=2, seed=0).shape == (2, 4, vlm.backbone.embed_dim)
    assert torch.equal(reference_features(feats, k=2, seed=0), reference_features(feats, k=2, seed=0))
    assert reference_features(feats, k=10).shape[0] == 3
