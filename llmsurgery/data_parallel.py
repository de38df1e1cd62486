"""Data parallel under `torchrun` / `accelerate launch`: the trained passes split each step's batch.

A launcher describes the processes in the environment (WORLD_SIZE, RANK, MASTER_ADDR, ...); `join()` makes
this process one of them (gloo on CPU processes, NCCL on GPUs, one GPU per process by LOCAL_RANK). Every
process then runs the same command on the same data. Where a pass trains (kv-compress, heal), each step's
global batch (`--batch-size`) is cut into one contiguous share per process, each process weights its mean
loss by its share of the windows, and the gradients are summed over processes before every optimizer step,
so all of them take the step one process would take on the whole batch (to float rounding). Held-out checks
and the rank search score a share of the windows each and sum. Only the main process (rank 0) writes the
output and prints; the others are silent.

Without a launcher every function here is the one-process identity: `share` returns the whole batch with
weight 1, and nothing is reduced.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import UserError


def launched() -> bool:
    """Whether a launcher started several processes for this command."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def accelerate_cpu_processes() -> int | None:
    """The `--num_processes` N > 1 of an `accelerate launch --cpu` that started this as its only process.

    Without `--mpirun_hostfile`, accelerate's CPU launcher runs the script once, in one process, whatever
    --num_processes says (accelerate 1.x). Read from the launcher's command line (Linux /proc); None when
    this process was not started that way, or the launcher cannot be read.
    """
    if launched() or os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1"):
        return None
    try:
        argv = [a.decode() for a in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if a]
        # `accelerate launch ...`, `accelerate-launch ...` or `python -m accelerate.commands.launch ...`
        starts = ("launch", "accelerate.commands.launch")
        start = next(i for i, a in enumerate(argv) if a in starts or Path(a).name == "accelerate-launch") + 1
        from accelerate.commands.launch import launch_command_parser

        args, _ = launch_command_parser().parse_known_args(argv[start:])
    except (OSError, StopIteration, ImportError, SystemExit, UnicodeDecodeError):
        return None
    if args.mpirun_hostfile or (args.num_machines or 1) > 1 or not args.num_processes:
        return None
    return args.num_processes if args.num_processes > 1 else None


def launcher_command(launcher: str, processes: int, port: int | str, address: str = "127.0.0.1") -> list[str]:
    """The start of a command line that runs `llmsurgery ...` in `processes` processes on this machine:
    `torchrun`, `accelerate` (launch --cpu, which then relaunches with torchrun, see above) or
    `accelerate-fsdp` (launch --use_fsdp)."""
    if launcher == "torchrun":
        start = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        start += ["--master-addr", address, "--master-port", str(port)]
    else:
        mode = "--use_fsdp" if launcher == "accelerate-fsdp" else "--cpu"
        start = [sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", str(processes)]
        start += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        start += ["--main_process_ip", address, "--main_process_port", str(port)]
    return [*start, "-m", "llmsurgery"]


def relaunch_with_torchrun(processes: int) -> None:
    """Replace this process by torchrun starting `processes` copies of the same llmsurgery command."""
    port, address = os.environ.get("MASTER_PORT", "29500"), os.environ.get("MASTER_ADDR", "127.0.0.1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*launcher_command("torchrun", processes, port, address), *sys.argv[1:]])


def start_processes() -> None:
    """At a command's start under a launcher: relaunch `accelerate launch --cpu --num_processes N` (which runs one
    process) as N under torchrun; join the process group; only the main process prints."""
    from .console import err, out

    if os.environ.get("ACCELERATE_USE_CPU") and "WORLD_SIZE" not in os.environ:
        processes = accelerate_cpu_processes()
        if processes:  # accelerate launch --cpu --num_processes N ran one process: start the N with torchrun
            err.print(
                f"accelerate launch --cpu runs one process without --mpirun_hostfile: "
                f"starting {processes} with torchrun",
                soft_wrap=True,
            )
            relaunch_with_torchrun(processes)
    if launched():
        join()
        out.quiet = err.quiet = not is_main()  # one process prints


def join() -> None:
    """Join the process group the launcher describes (once; nothing without a launcher): NCCL with a GPU per
    process where CUDA is present (unless `accelerate launch --cpu`), else gloo."""
    if not launched() or dist.is_initialized():
        return
    # rank 0 alone writes a large output while the others wait: the default 10-minute watchdog is too short
    timeout = timedelta(hours=24)
    if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def check_batch(batch_size: int, what: str = "--batch-size") -> None:
    """Each process needs at least one window of every step's batch."""
    if batch_size < world_size():
        raise UserError(
            f"{what} {batch_size} is smaller than the {world_size()} processes: each needs at least one window "
            "per step (the batch size is the global batch)"
        )


def share(batch: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(this process's contiguous part of a global batch, its share of the windows)."""
    if world_size() == 1:
        return batch, 1.0
    part = torch.tensor_split(batch, world_size())[rank()]
    return part, len(part) / len(batch)


def strided(windows: torch.Tensor) -> torch.Tensor:
    """The windows this process scores of a set that is scored once and summed (every world_size-th)."""
    return windows[rank() :: world_size()]


def sum_gradients_(params: Iterable[torch.Tensor]) -> None:
    """Sum the parameters' gradients over the processes, in one flat buffer.

    A parameter no process has a gradient for keeps none (an optimizer skips it, as in one process); one that
    only some processes reached counts 0 on the others.
    """
    params = list(params)
    if world_size() == 1 or not params:  # the same list in every process (`same_start_` checks)
        return
    reached = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=wire_device())
    dist.all_reduce(reached, op=dist.ReduceOp.MAX)
    params = [p for p, r in zip(params, reached.tolist()) if r]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params]).to(wire_device())
    dist.all_reduce(flat)
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(part.view_as(p.grad))


def wire_device() -> str:
    """Where reduced tensors and FSDP shards live: NCCL reduces GPU tensors only."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def sum_tensor_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the tensor summed over the processes."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def sum_float(value: float) -> float:
    """A number summed over the processes (float64 on the wire)."""
    if world_size() == 1:
        return value
    return float(sum_tensor_(torch.tensor([value], dtype=torch.float64, device=wire_device())))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def once(write: Callable[[], object]) -> None:
    """`write()` in the main process only; every process returns when it is done (and when it failed)."""
    try:
        if is_main():
            write()
    finally:
        barrier()


def same_start_(params: Iterable[torch.Tensor], what: str) -> None:
    """Before training: every process trains the same tensors, from rank 0's values (as DDP starts).

    Refuses, in one line, processes whose earlier steps chose different tensors to train (they would sum
    gradients of different things).
    """
    if world_size() == 1:
        return
    params = list(params)
    shape = torch.tensor([len(params), sum(p.numel() for p in params)], device=wire_device())
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        raise UserError(f"the processes would train different {what}; run it in one process")
    with torch.no_grad():
        for p in params:
            wire = p.detach().to(wire_device())
            dist.broadcast(wire, src=0)
            p.copy_(wire.to(p.device))


def from_main(value):
    """The main process's `value` on every process (a picklable object)."""
    if world_size() == 1:
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Collectives:
    """What lm-eval's HFLM asks of an accelerator when it scores data-parallel: gather, wait, unwrap.

    HFLM given a model object assumes one process; with this as its accelerator and the process group's rank
    and size, lm-eval gives each process every world_size-th request and gathers the scores on rank 0.
    """

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        where = tensor.device
        tensor = (tensor.reshape(1) if tensor.dim() == 0 else tensor).contiguous().to(wire_device())
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts).to(where)

    def wait_for_everyone(self) -> None:
        barrier()

    def unwrap_model(self, model):
        return model  # never wrapped: each process holds the whole model
