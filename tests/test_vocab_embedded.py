"""Vocabulary filter on the real SmolLM2 tokenizer, and the real embedded LLM's untrained predictions."""

import pytest
import torch

import lexvla
from lexvla.models.text import load_tokenizer
from lexvla.vocab import Vocabulary, VocabularyFilter, build_vocabulary


@pytest.fixture(scope="module")
def smol_tokenizer():
    return load_tokenizer("embedded:smollm2")


def test_vocabulary_filter_on_smollm2(smol_tokenizer):
    vocab = build_vocabulary(smol_tokenizer)
    assert 20000 < len(vocab) < 22000  # 49,152 tokens -> 20,998 words (docs/architecture.md)
    for word in ("red", "circle", "apple", "dog", "beach", "triangle", "bee", "ant", "owl", "hen", "ear",
                 "the", "of", "ox", "ok"):
        assert word in vocab, word
    # Word-initial BPE fragments (seen as top words of trained image vectors and collapsed vectors),
    # two-letter pieces, shapeless tokens, continuations, special tokens, numbers, one-letter tokens.
    for junk in ("includ", "physic", "cir", "aaa", "tri", "fou", "rr", "ge", "ze", "th", "st", "wh",
                 "strugg", "authent", "affili", "tion", "<|endoftext|>", "2024", "a"):
        assert junk not in vocab, junk
    assert all(w.isalpha() and w.islower() and w.isascii() for w in vocab.words)
    assert len(set(vocab.words)) == len(vocab)
    tokens = smol_tokenizer.convert_ids_to_tokens(vocab.token_ids[:50])
    assert all(t.startswith("Ġ") for t in tokens)
    # Deterministic, and the letters-only variant is a superset.
    assert build_vocabulary(smol_tokenizer).words == vocab.words
    loose = build_vocabulary(smol_tokenizer, VocabularyFilter(dictionary="none"))
    assert set(vocab.words) < set(loose.words)
    # Each rule only removes words: turning the shape and fragment rules off gives a superset.
    no_fragments = build_vocabulary(smol_tokenizer, VocabularyFilter(fragment_ratio=0))
    no_rules = build_vocabulary(smol_tokenizer, VocabularyFilter(fragment_ratio=0, shape_rules=False))
    assert set(vocab.words) < set(no_fragments.words) < set(no_rules.words)
    assert {"tri", "cir", "includ", "physic"} <= set(no_fragments.words) - set(vocab.words)
    assert {"ge", "ze", "rr", "aaa"} <= set(no_rules.words) - set(no_fragments.words)


def test_fragment_and_shape_rules():
    from lexvla.vocab import _shape_ok, is_fragment

    # "bee" has a 160x more frequent extension ("been") but is common itself: it stays.
    assert [is_fragment(w) for w in ("includ", "physic", "tri", "fou", "bee", "owl", "apple")] == [
        True, True, True, True, False, False, False]
    assert not is_fragment("includ", ratio=0)  # 0 turns the rule off
    assert [_shape_ok(w) for w in ("ox", "ge", "rr", "aaa", "hmm", "owl", "zoo")] == [
        True, False, False, False, False, True, True]
    with pytest.raises(ValueError, match="fragment_ratio"):
        VocabularyFilter(fragment_ratio=-1)


def test_vocabulary_round_trip(tmp_path, smol_tokenizer):
    vocab = build_vocabulary(smol_tokenizer)
    vocab.save(tmp_path / "v.json")
    again = Vocabulary.load(tmp_path / "v.json")
    assert again.words == vocab.words and again.fingerprint() == vocab.fingerprint()
    assert again.index("RED") == vocab.index("red")
    with pytest.raises(KeyError, match="not in the lexical vocabulary"):
        vocab.index("qwertyuiop")


@pytest.mark.slow
def test_embedded_llm_untrained_text_vector_names_the_caption():
    model = lexvla.create_model("lexvla-embedded", trained=False).eval()
    with torch.no_grad():
        out = model.encode_text(["a photo of a red apple", "a blue circle", "a dog on the beach"])
    words = [[w for w, _ in ws] for ws in model.top_words(out, k=10)]
    assert {"apple", "red"} & set(words[0])
    assert {"blue", "circle"} & set(words[1])
    assert {"dog", "beach"} & set(words[2])
    # Sparse from the first step: the centering mapper leaves a minority of words above 1/sqrt(V),
    # and different captions are far from the cosine-0.99 collapse of plain elu+1.
    sparse = model.sparsify(out)
    assert (sparse.active_words() < 0.25 * len(model.vocab)).all()
    cos = model.similarity(out, out)
    assert cos[0, 1] < 0.95 and cos[1, 2] < 0.95
