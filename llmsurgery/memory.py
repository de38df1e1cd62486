"""How much memory a job may use and how much its whole model would need, checked before anything loads.

The estimate is the weights at the compute dtype (parameter counts from the checked headers, so no file is
read again) times a factor for the copies, gradients and optimizer state a pass keeps, plus 0.5 GiB for the
runtime and activations. On the CPU it is held against what this process may use (its share of the machine
under a launcher); with --device cuda, against the free memory of its GPU.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import UserError

RUNTIME_BYTES = 1 << 29  # the runtime and activations beside the weights


def available_memory() -> int:
    """Bytes this process may still use: MemAvailable, or its memory cgroup's headroom (v1 or v2) when lower.

    The cgroup's inactive file cache counts as free (the kernel reclaims it first), as docker and kubelet count.
    """
    found = [1 << 62]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "memory":  # cgroup v1
                base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            elif controllers == "":  # cgroup v2
                base = Path("/sys/fs/cgroup") / path.lstrip("/")
                names = ("memory.max", "memory.current", "inactive_file")
            else:
                continue
            limit = base / names[0]
            if limit.is_file() and limit.read_text().strip() != "max":
                stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
                used = int((base / names[1]).read_text()) - int(stat.get(names[2], 0))
                found.append(int(limit.read_text()) - used)
    except (OSError, ValueError):
        pass
    return min(found)


def cpu_share() -> int:
    """Bytes of CPU memory this process may use: under a launcher, the processes on this machine share it."""
    return available_memory() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def gpu_memory() -> int:
    """Bytes free on the GPU a whole model loads onto (this process's own under a launcher)."""
    import torch

    return torch.cuda.mem_get_info(torch.cuda.current_device())[0]


def estimate(shapes: dict[str, tuple[int, ...]], dtype, device: str, factor: float) -> tuple[int, int, int]:
    """(bytes the whole model would need, bytes available on `device`, parameters) for a checkpoint's shapes."""
    params = sum(math.prod(shape) for shape in shapes.values())
    need = int(params * dtype.itemsize * factor) + RUNTIME_BYTES
    return need, cpu_share() if device == "cpu" else gpu_memory(), params


def check_memory(plan) -> None:
    """Refuse, before loading, a whole-model job (`runner.Plan`) whose model would not fit the memory it may use.

    The factor is the largest `memory_factor` of the passes. Sharded (--fsdp), a process holds 1/N of the
    trained passes' share: on the GPU alone, or beside the loaded model on the CPU; on GPUs, every process
    first loads the whole model in CPU memory, which must fit too.
    """
    from . import data_parallel

    job = plan.job
    if not plan.model.weights:
        return
    on_gpu = plan.device == "cuda"
    factor = max(cfg.memory_factor for cfg in job.passes)
    trains = any(cfg.trains for cfg in job.passes)
    sharded = plan.sharded and trains
    if sharded:  # each process's shards, with their training state, on its GPU or beside the loaded model
        shards = factor / data_parallel.world_size()
        if on_gpu:  # the model (and heal's teacher) load whole in CPU memory first, in every process
            host = estimate(plan.model.shapes, plan.dtype, "cpu", factor)
            if host[0] > host[1]:
                raise UserError(
                    f"with --fsdp each process loads the whole model in CPU memory before sharding it: about "
                    f"{host[0] / 2**30:.1f} GiB, but {host[1] / 2**30:.1f} GiB is available to each; "
                    "use fewer processes per machine or a machine with more memory"
                )
        factor = shards if on_gpu else factor + shards
    need, available, params = estimate(plan.model.shapes, plan.dtype, plan.device, factor)
    if need <= available:
        return
    if plan.stream_problem is None:
        remedy = "run it with --stream on" + (" (without the evaluation)" if job.options.eval else "")
    else:
        streamed = [cfg.streams_as for cfg in job.passes if cfg.streams_as and not cfg.streamable]
        remedy = (
            ("use a larger GPU" if on_gpu else "use a GPU (--device cuda)")
            + (", shard it over several GPUs (--fsdp under torchrun)" if trains and not sharded else "")
            + "".join(f", {note} (runs layer by layer)" for note in streamed)
            + " or a bigger machine"
        )
    names = ", ".join(dict.fromkeys(cfg.name for cfg in job.passes))
    count = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
    where = "is free on the GPU" if on_gpu else "is available"
    raise UserError(
        f"{names} would hold the whole model in memory: about {need / 2**30:.1f} GiB "
        f"({count} parameters in {str(plan.dtype).removeprefix('torch.')}), but {available / 2**30:.1f} GiB "
        f"{where}; {remedy}"
    )
