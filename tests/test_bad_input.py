"""Issue 12.5-12.13 (bad input side): no code from checkpoints, a literal prompt template, sanity limits on
config shapes, one clear line naming the file (and line) for bad files, web errors without server paths,
and a running web app that follows adds/deletes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lexvla.config import AdapterConfig, LexVLAConfig, TextConfig
from lexvla.index.build import collect_images, read_captions


# ------------------------------------------------------------------------------ checkpoints with code
def remote_code_folder(root: Path) -> tuple[Path, Path]:
    folder = root / "evil-llm"
    folder.mkdir()
    marker = root / "ran.txt"
    code = f"open({str(marker)!r}, 'w').write('the checkpoint ran code')\n"
    (folder / "evil.py").write_text(code + "from transformers import PretrainedConfig\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    cfg = {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                               "AutoModelForCausalLM": "evil.EvilModel",
                                               "AutoTokenizer": ["evil.EvilTokenizer", None]}}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": cfg["auto_map"]}))
    return folder, marker


def test_a_checkpoint_that_names_its_own_code_is_refused(tmp_path: Path) -> None:
    import lexvla
    from lexvla.models.text import load_causal_lm, load_tokenizer

    folder, marker = remote_code_folder(tmp_path)
    with pytest.raises(ValueError, match="auto_map"):
        load_causal_lm(str(folder))
    with pytest.raises(ValueError, match="auto_map"):
        load_tokenizer(str(folder))
    with pytest.raises(ValueError, match="never runs code"):  # the probe: a model config pointing at it
        lexvla.create_model("lexvla-tiny", **{"text.source": str(folder)})
    assert not marker.exists()


# ------------------------------------------------------------------------------ config sanity
@pytest.mark.parametrize("prompt", ["{caption}{caption:>200000000}", "{caption.__class__.__mro__}",
                                    "{caption!r}", "no field", "{caption} {other}", "{0} {caption}",
                                    "{caption}{caption}"])
def test_prompt_must_be_a_literal_template_with_one_caption(prompt: str) -> None:
    with pytest.raises(ValueError, match="prompt"):
        TextConfig(prompt=prompt)


def test_plain_prompts_still_work() -> None:
    assert TextConfig(prompt='Caption {{quoted}}: "{caption}" in one word:').prompt.count("{caption}") == 1


@pytest.mark.parametrize("overrides", [{"adapter.width": 10**9, "adapter.heads": 1}, {"backbone.image_size": 10**6},
                                       {"backbone.grid": 100000}, {"text.arch": {"num_hidden_layers": 10**6}},
                                       {"text.arch": {"hidden_size": 2**40}}, {"text.max_length": 10**9}])
def test_config_shapes_are_limited_before_allocating(overrides: dict) -> None:
    from lexvla.models.zoo import get_config

    with pytest.raises(ValueError, match="must be"):
        get_config("lexvla-tiny").replace(**overrides)


def test_unknown_nested_keys_and_bad_files_are_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"adapter": {"widht": 64}}))
    with pytest.raises(ValueError, match=r"config.json: unknown config keys \['adapter.widht'\]"):
        LexVLAConfig.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: a config must be a JSON object"):
        LexVLAConfig.load(path)
    with pytest.raises(ValueError, match="unknown config keys"):
        AdapterConfig(**{"width": 64}) and LexVLAConfig(adapter={"nope": 1})


def test_a_damaged_weights_file_names_it(tmp_path: Path, tiny_model) -> None:
    import lexvla

    tiny_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        lexvla.load(tmp_path / "m")


# ------------------------------------------------------------------------------ data files
def test_bad_text_files_name_the_file_and_line(tmp_path: Path) -> None:
    txt = tmp_path / "captions.txt"
    txt.write_bytes(b"a red circle\na blue \xff square\n")
    with pytest.raises(ValueError, match=r"captions.txt:2: not valid UTF-8"):
        read_captions(txt)
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2: contains a lone surrogate"):
        read_captions(jsonl)
    rows = tmp_path / "images.jsonl"
    rows.write_text('{"path": "a.png"}\n["not", "an", "object"]\n')
    with pytest.raises(ValueError, match=r"images.jsonl:2: each line must be a JSON object, got list"):
        collect_images(rows)


# ------------------------------------------------------------------------------ the web app
def test_web_errors_hide_server_paths_and_follow_deletes(tmp_path: Path, tiny_model) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lexvla.cli import main
    from lexvla.index import SparseIndex, build_index
    from lexvla.web import SearchService, WebConfig, create_app

    (tmp_path / "imgs").mkdir()
    for name, colour in (("red.png", (220, 20, 20)), ("blue.png", (20, 20, 220)), ("green.png", (20, 200, 20))):
        Image.new("RGB", (40, 40), colour).save(tmp_path / "imgs" / name)
    build_index(tiny_model, images=tmp_path / "imgs", out=tmp_path / "idx", progress=False)
    (tmp_path / "imgs" / "red.png").write_bytes(b"\x89PNG\r\n\x1a\n broken after the header")
    with SparseIndex.open(tmp_path / "idx") as index, \
            TestClient(create_app(SearchService(tiny_model, index, WebConfig()))) as client:
        r = client.get("/api/explain", params={"id": "red.png"})
        assert r.status_code in (404, 422), r.text
        assert str(tmp_path) not in r.text and "red.png" in r.text
        assert client.get("/api/image", params={"id": "blue.png"}).status_code == 200
        assert main(["index", "delete", str(tmp_path / "idx"), "blue.png"]) == 0  # while serving
        assert client.get("/api/image", params={"id": "blue.png"}).status_code == 404
        hits = client.get("/api/search", params={"q": "blue", "k": 5}).json()["hits"]
        assert "blue.png" not in [h["id"] for h in hits]


def test_bad_pairs_manifests_name_the_file_and_line(tmp_path: Path) -> None:
    """The one pairs manifest reader (training, evaluation, indexing, CAL)."""
    from lexvla.data.records import read_manifest

    path = tmp_path / "pairs.jsonl"
    for body, message in ((b'{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": "\xff"}\n',
                           "pairs.jsonl:2: not valid UTF-8"),
                          (b'{"image": "a.png", "caption": "lone \\ud800"}\n', "pairs.jsonl:1: contains a lone surrogate"),
                          (b'["a.png", "a caption"]\n', "pairs.jsonl:1.*JSON object")):
        path.write_bytes(body)
        with pytest.raises(ValueError, match=message):
            read_manifest(path)
