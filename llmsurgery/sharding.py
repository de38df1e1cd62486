"""FSDP for the trained passes (heal, kv-compress training): the weights sharded over the processes.

Under a launcher with FSDP asked for (`--fsdp`, or `accelerate launch --use_fsdp`), the training loops run on a
sharded copy of the model (torch FSDP2 `fully_shard`, one unit per decoder layer plus one for the rest):
each process keeps 1/N of every tensor, on its own device, and a layer's whole weights exist only while
that layer runs forward or backward. So N devices together hold a model that one device cannot. The batch
is still split as in plain data parallel (`data_parallel.share`), and the gradients of sharded trained
tensors are summed over the processes (divide factor 1), like `data_parallel.sum_gradients_` for the rest.

The copy is a second module tree: the loaded model is not changed while it trains. When the loop ends,
every trained tensor's full value is gathered back into the model's own tensor, so the steps after
training (the rank search, folding, saving) see an ordinary model. Without FSDP, `training_copies` hands
back the models themselves.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from . import data_parallel
from .errors import UserError


def from_accelerate() -> bool:
    """`accelerate launch --use_fsdp` (or an accelerate config with FSDP) started this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("true", "1")


def check(flag: bool, trained: list[str], device: str) -> None:
    """Refuse `--fsdp` where it cannot act (accelerate's own FSDP setting is followed where it can), and
    sharding onto GPUs that `--device cpu` did not ask for (NCCL reduces GPU tensors only)."""
    if (flag or from_accelerate()) and trained and device == "cpu" and data_parallel.world_size() > 1:
        if data_parallel.wire_device() == "cuda":
            raise UserError(
                "FSDP here shards onto the processes' GPUs (NCCL): add --device cuda "
                "(or start CPU processes with accelerate launch --cpu)"
            )
    if not flag:
        return
    if not data_parallel.launched():
        raise UserError(
            "--fsdp (fsdp: true in a recipe) shards the model over several processes: "
            "start the command with torchrun or accelerate launch (e.g. torchrun --nproc-per-node 2 -m llmsurgery ...)"
        )
    if not trained:
        raise UserError(
            "--fsdp (fsdp: true in a recipe) shards the passes that train (heal, kv-compress with training); "
            "this job trains nothing"
        )


def shards(fsdp: bool) -> bool:
    """Whether a job's trained passes run on sharded copies: FSDP asked for (`--fsdp`, or accelerate's own FSDP
    setting) and several processes to shard over. The runner decides once per job (`RunContext.sharded`)."""
    return (fsdp or from_accelerate()) and data_parallel.world_size() > 1


def _wrapped_copy(model: nn.Module, shared: tuple[object, ...]) -> nn.Module:
    """A module tree whose tensors are new tensor objects over the model's storage (no weight memory), so
    that FSDP moving or replacing them leaves the model alone; objects in `shared` are not copied."""
    memo: dict[int, object] = {id(obj): obj for obj in shared}
    for p in model.parameters():
        memo.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=p.requires_grad))
    for b in model.buffers():
        memo.setdefault(id(b), b.detach())
    return copy.deepcopy(model, memo)


def _sharded_copy(model: nn.Module, shared: tuple[object, ...]) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .arch import decoder_layers

    mesh = init_device_mesh(data_parallel.wire_device(), (data_parallel.world_size(),))
    # gradients reduced in float32 and summed: each process's loss is already weighted by its share
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    sharded = _wrapped_copy(model, shared)
    for unit in [*decoder_layers(sharded), sharded]:  # a layer moves to the device and is cut, then the next
        # the root too gives its gathered embedding and head back after every forward (also no-grad ones)
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain sum on the wire (gloo has no PREMUL_SUM)
    return sharded


@contextmanager
def training_copies(
    models: list[nn.Module],
    trained: dict[str, nn.Parameter],
    shared: tuple[object, ...] = (),
    sharded: bool = False,
) -> Iterator[tuple[list[nn.Module], dict[str, nn.Parameter]]]:
    """(the models to run, the tensors to train): with `sharded` (`shards`), FSDP copies and their shards of
    `trained` (names as in models[0]), else the models and `trained` themselves.

    On leaving, the trained shards' full values are copied into `trained` on every process.
    """
    if not sharded:
        yield models, trained
        return
    from .console import status

    with status(f"Sharding the model over {data_parallel.world_size()} processes (FSDP)"):
        copies = [_sharded_copy(m, shared) for m in models]
    own = dict(copies[0].named_parameters())
    missing = [name for name in trained if name not in own]
    if missing:
        raise UserError(f"FSDP: the sharded model has no tensor {missing[0]}")
    shards = {name: own[name] for name in trained}
    yield copies, shards
    # after the loop only: gathering is collective, and a failed process would leave the others waiting
    with torch.no_grad():
        for name, target in trained.items():
            value = shards[name]
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            target.copy_(full.to(target.device, target.dtype))
