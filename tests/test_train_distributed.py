"""The gathered contrastive loss on 2 gloo processes equals one process holding the global batch.

A small "encoder" (linear maps + elu+1 + normalise, like the mapper) is wrapped in real DDP; each rank
feeds its share of the batch. Loss value and parameter gradients (after DDP's averaging) must match the
single-process loss on the whole batch, in both modes (global / local loss) and with unequal shares
(skipped samples). One ``mp.spawn`` runs every case to keep the test short.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lexvla.distributed import gather
from lexvla.losses import LexVLALoss

V, D = 50, 12
CASES = [  # (local_loss, rows of rank 0, rows of rank 1, regulariser)
    (False, 4, 4, "overuse"),
    (True, 4, 4, "overuse"),
    (False, 5, 3, "flops"),
    (True, 3, 5, "overuse"),
    (True, 4, 4, "none"),
]


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img = nn.Linear(D, V)
        self.txt = nn.Linear(D, V)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return (F.normalize(F.elu(self.img(x)) + 1, dim=-1), F.normalize(F.elu(self.txt(y)) + 1, dim=-1),
                self.logit_scale.exp())


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)


def _reference(local: bool, n: int, reg: str) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    enc = Encoder()
    x, y = _data(n)
    img, txt, scale = enc(x, y)
    out = LexVLALoss(reg, 0.3, 0.2, local_loss=local)(img, txt, scale, step=0)
    out.loss.backward()
    return float(out.value), {k: p.grad.clone() for k, p in enc.named_parameters()}


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        for case, (local, n0, n1, reg) in enumerate(CASES):
            torch.manual_seed(0)
            enc = nn.parallel.DistributedDataParallel(Encoder())
            x, y = _data(n0 + n1)
            rows = slice(0, n0) if rank == 0 else slice(n0, n0 + n1)
            img, txt, scale = enc(x[rows], y[rows])
            out = LexVLALoss(reg, 0.3, 0.2, local_loss=local)(img, txt, scale, step=0)
            out.loss.backward()
            results[(case, rank)] = (float(out.value), out.global_batch,
                                     {k.removeprefix("module."): p.grad.clone() for k, p in enc.named_parameters()})
        # gather keeps this rank's rows differentiable and puts every rank's rows in rank order
        x = torch.full((rank + 1, 2), float(rank), requires_grad=True)
        g = gather(x, with_grad=False)
        g.vectors.sum().backward()
        results[("gather", rank)] = (g.vectors.detach().clone(), g.offset, x.grad.clone())
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results() -> dict:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
    return dict(results)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_two_processes_match_one(two_rank_results: dict, case: int) -> None:
    local, n0, n1, reg = CASES[case]
    ref_loss, ref_grads = _reference(local, n0 + n1, reg)
    for rank in (0, 1):
        loss, batch, grads = two_rank_results[(case, rank)]
        assert batch == n0 + n1
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=f"{name} (case {case})")


def test_gather_order_and_local_gradient(two_rank_results: dict) -> None:
    for rank in (0, 1):
        vectors, offset, grad = two_rank_results[("gather", rank)]
        assert torch.equal(vectors, torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert offset == (0 if rank == 0 else 1)
        assert torch.equal(grad, torch.ones(rank + 1, 2))


def test_single_process_is_the_plain_loss() -> None:
    """Without torch.distributed both modes are exactly the plain loss of the batch."""
    torch.manual_seed(0)
    img = F.normalize(torch.rand(6, V), dim=-1)
    txt = F.normalize(torch.rand(6, V), dim=-1)
    scale = torch.tensor(10.0)
    plain = LexVLALoss("overuse", 0.1, 0.1)(img, txt, scale, step=0).loss
    c = LexVLALoss("none")(img, txt, scale).loss
    torch.testing.assert_close(c, 0.5 * (F.cross_entropy(scale * img @ txt.T, torch.arange(6))
                                         + F.cross_entropy(scale * txt @ img.T, torch.arange(6))))
    for local in (False, True):
        out = LexVLALoss("overuse", 0.1, 0.1, local_loss=local)(img, txt, scale, step=0)
        assert float(out.loss) == pytest.approx(float(plain), rel=1e-6)
        assert float(out.value) == pytest.approx(float(plain), rel=1e-6)


def test_grad_accum_is_one_contrastive_batch() -> None:
    """K micro-batches through the cached-embedding step give the loss and the gradients of one batch of
    K x B pairs (lexvla-tiny: LoRA, adapter and codebook all get gradients)."""
    import lexvla
    from lexvla.data import Batch
    from lexvla.distributed import build_accelerator
    from lexvla.train.trainer import _accumulated_step, _plain_step

    acc, setup = build_accelerator()
    assert setup.world_size == 1 and setup.backend == "none"
    model = lexvla.create_model("lexvla-tiny").train()
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = model.preprocess([Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(8)])
    captions = [f"a {c} {s}" for c in ("red", "blue", "green", "gray") for s in ("circle", "square")]
    whole = Batch(captions=captions, ids=[str(i) for i in range(8)], image_ids=[str(i) for i in range(8)],
                  pixels=pixels)
    halves = [Batch(captions=captions[i:i + 4], ids=whole.ids[i:i + 4], image_ids=whole.ids[i:i + 4],
                    pixels=pixels[i:i + 4]) for i in (0, 4)]
    loss_fn = LexVLALoss("overuse", 0.1, 0.1)
    trained = [p for p in model.parameters() if p.requires_grad]

    res, _, _ = _plain_step(acc, model, loss_fn, whole, None, step=3)
    ref = [p.grad.clone() for p in trained]
    model.zero_grad(set_to_none=True)
    cached, image, _ = _accumulated_step(acc, model, loss_fn, [(b, None) for b in halves], step=3)
    assert cached.global_batch == 8 and image.shape[0] == 8
    assert float(cached.value) == pytest.approx(float(res.value), abs=1e-6)
    for k in res.terms:
        assert float(cached.terms[k]) == pytest.approx(float(res.terms[k]), rel=1e-5, abs=1e-9), k
    for p, r in zip(trained, ref, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-7)


def test_launch_environment_is_read_in_one_place() -> None:
    from lexvla.distributed import DistributedSetupError, LaunchEnv, check_launch

    assert LaunchEnv.from_environ({}) == LaunchEnv(1, 0, 0, "single", "")
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x"}
    assert LaunchEnv.from_environ(env) == LaunchEnv(4, 3, 1, "torchrun", "WORLD_SIZE")
    assert LaunchEnv.from_environ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}).launcher == "mpirun"
    assert LaunchEnv.from_environ({**env, "ACCELERATE_MIXED_PRECISION": "no"}).launcher == "accelerate"
    with pytest.raises(DistributedSetupError, match="no RANK is set"):
        LaunchEnv.from_environ({"WORLD_SIZE": "2"})
    with pytest.raises(DistributedSetupError, match="outside WORLD_SIZE=2"):
        LaunchEnv.from_environ({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(DistributedSetupError, match="not an integer"):
        LaunchEnv.from_environ({"WORLD_SIZE": "two"})
    # `accelerate launch --cpu --num_processes 2`: one process, MASTER_ADDR exported, no WORLD_SIZE
    with pytest.raises(DistributedSetupError, match="started a single process"):
        check_launch({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert check_launch({"ACCELERATE_USE_CPU": "True"}).world_size == 1  # --cpu, one process: fine
