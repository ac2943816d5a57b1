"""A model whose image side was never trained says so, once, wherever it is used: create_model, encode,
explain, index build, serve; a trained checkpoint and a model under training never warn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import lexvla
from lexvla.cli import main
from lexvla.models.lexvla import LexVLA, UntrainedModelWarning


def _untrained(record) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, UntrainedModelWarning)]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.fromarray(np.full((40, 40, 3), (220, 30, 30), np.uint8)).save(path)
    return path


def test_create_model_warns_once_and_encode_does_not_repeat_it(image):
    with pytest.warns(UntrainedModelWarning, match="'lexvla-tiny': its image side was never trained") as record:
        model = lexvla.create_model("lexvla-tiny").eval()
        with torch.no_grad():
            model.encode_image([image])
            model.encode_image(torch.rand(2, 3, 56, 56))
    assert len(_untrained(record)) == 1
    assert not model.image_trained


def test_a_model_built_directly_warns_at_its_first_image_encode():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = LexVLA(lexvla.get_config("lexvla-tiny")).eval()
        assert not _untrained(record)  # building alone: nothing yet
        with torch.no_grad():
            model.encode_image(torch.rand(1, 3, 56, 56))
            model.encode_image(torch.rand(1, 3, 56, 56))
    assert len(_untrained(record)) == 1


def test_trained_checkpoint_and_training_never_warn(tmp_path, image):
    from lexvla.train import TrainConfig, build_model

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = build_model(TrainConfig(steps=1))  # the trainer's model (lexvla-tiny): being trained, no warning
        assert model.image_trained
        model.save_pretrained(tmp_path / "ckpt")
        for restored in (lexvla.load(tmp_path / "ckpt"), lexvla.create_model(tmp_path / "ckpt")):
            assert restored.image_trained
            with torch.no_grad():
                restored.encode_image([image])
    assert not _untrained(record)


def _cli_warnings(argv: list[str]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(argv) == 0
    return _untrained(record)


def test_every_command_says_it_once(tmp_path, image, monkeypatch, capsys):
    from lexvla.index import cli as index_cli

    index_cli._create_model.cache_clear()  # commands in one process share a model; this test needs fresh ones
    assert len(_cli_warnings(["encode", str(image), "--text", "a red square", "--model", "lexvla-tiny"])) == 1
    assert len(_cli_warnings(["explain", str(image), "--text", "red", "--model", "lexvla-tiny",
                              "--out", str(tmp_path / "explain")])) == 1
    assert len(_cli_warnings(["index", "build", "--model", "lexvla-tiny", "--images", str(image),
                              "--out", str(tmp_path / "idx"), "--no-progress"])) == 1
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))  # build the app, bind nothing
    assert len(_cli_warnings(["serve", str(tmp_path / "idx"), "--model", "lexvla-tiny"])) == 1
    assert served
    capsys.readouterr()
