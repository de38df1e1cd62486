"""Heal a layer-pruned model by distillation towards the original (teacher) on CPU.

ShortGPT (arXiv 2403.03853) removes layers and stops; Gromov et al. (arXiv 2403.17887) heal with QLoRA
on a GPU. Here the pruned model (student) learns to match the original's next-token distribution,
``KL(teacher || student)`` on logits, while only a few parameters train: by default the MLPs of the
layers on both sides of each removed block plus every RMSNorm weight. The teacher's logits are
computed per batch and dropped after it. Nothing about the architecture changes: the output is the
same standard checkpoint with different values in the trained tensors.

A held-out check (windows of the same calibration source that training never sees) measures the
KL before and after; if healing made it worse, the trained tensors go back to their old values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import data_parallel, sharding
from ...arch import arch_for, decoder_layers, get_submodule
from ...console import stepper
from ...defaults import HEAL_HELD_OUT_WINDOWS as VALIDATION_WINDOWS
from ...errors import UserError
from ...training import cycled_batch, take_step, warmup_cosine
from ..base import record_pass


def removed_from_history(history: dict) -> tuple[list[int], int] | None:
    """Layers (0-based, in the first pruned model's numbering) that the history's prune passes removed, and
    the count before."""
    passes = [
        p
        for p in history.get("passes", [])
        if record_pass(p) == "prune-bi" and p.get("report", {}).get("removed_layers")
    ]
    if not passes:
        return None
    original = list(range(passes[0]["report"]["layers_before"]))
    removed: list[int] = []
    for entry in passes:
        gone = set(entry["report"]["removed_layers"])
        removed += [original[i] for i in gone]
        original = [x for i, x in enumerate(original) if i not in gone]
    return sorted(removed), len(original) + len(removed)


def gap_neighbours(removed: list[int], n_teacher: int) -> list[int]:
    """Student indices of the kept layers just before and just after each run of removed layers."""
    gone = set(removed)
    kept = [i for i in range(n_teacher) if i not in gone]
    near = {i - 1 for i in gone if i - 1 not in gone and i - 1 >= 0} | {
        i + 1 for i in gone if i + 1 not in gone and i + 1 < n_teacher
    }
    return sorted(kept.index(i) for i in near)


def _norm_paths(model: nn.Module) -> list[str]:
    spec = arch_for(model)
    names = [spec.attn_norm, spec.mlp_norm, spec.attn_out_norm, spec.mlp_out_norm]
    if spec.qk_norm:
        names += [f"{spec.attn}.q_norm", f"{spec.attn}.k_norm"]
    prefix = spec.layers
    paths = [f"{prefix}.{i}.{n}" for i in range(len(decoder_layers(model))) for n in names if n]
    return paths + [spec.final_norm]


def trainable_modules(model: nn.Module, train: tuple[str, ...], near: list[int]) -> list[str]:
    """Module paths whose parameters heal trains, for the `train` choices (near: student layers beside the gaps)."""
    spec, n = arch_for(model), len(decoder_layers(model))
    mlp = spec.gate_proj.rpartition(".")[0]
    paths: list[str] = []
    for choice in train:
        if choice == "norms":
            paths += _norm_paths(model)
        elif choice == "mlp-near-gaps":
            paths += [f"{spec.layers}.{i}.{mlp}" for i in near]
        elif choice == "layers-near-gaps":
            paths += [f"{spec.layers}.{i}" for i in near]
        elif choice == "all-mlp":
            paths += [f"{spec.layers}.{i}.{mlp}" for i in range(n)]
        elif choice == "all":
            paths += [f"{spec.layers}.{i}" for i in range(n)]
    kept = [p for p in dict.fromkeys(paths) if not any(p.startswith(q + ".") for q in paths if q != p)]
    if not kept:
        raise UserError(
            "nothing to train: the student has no known gaps (say which layers are missing with --removed, "
            "or train norms / all-mlp / all)"
        )
    return kept


def _detach_parameters_(model: nn.Module, paths: list[str]) -> dict[str, nn.Parameter]:
    """Give the trained modules their own tensors (a teacher sharing them stays untouched); all else frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    trained: dict[str, nn.Parameter] = {}
    for path in paths:
        module = get_submodule(model, path)
        for sub_name, sub in module.named_modules():
            for name, param in list(sub._parameters.items()):
                if param is None:
                    continue
                fresh = nn.Parameter(param.detach().clone(), requires_grad=True)
                sub._parameters[name] = fresh
                trained[".".join(x for x in (path, sub_name, name) if x)] = fresh
    return trained


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in float32."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, use_cache=False).logits


@torch.no_grad()
def _held_out_kl(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, together: bool) -> float:
    """Mean KL over the held-out windows. Data parallel: each process scores every world_size-th window and
    the sums are added; `together` (FSDP), every process runs every window, as the layers gather together."""
    device = next(student.parameters()).device
    total = 0.0
    for w in windows if together else data_parallel.strided(windows):
        batch = w.unsqueeze(0).to(device)
        total += float(_kl(_logits(teacher, batch), _logits(student, batch)))
    # sharded: the mean of the processes' (equal) totals, so that all take the same keep-or-undo decision
    total = data_parallel.sum_float(total) / (data_parallel.world_size() if together else 1)
    return total / len(windows)


def _train_(
    student: nn.Module,
    teacher: nn.Module,
    trained: dict[str, nn.Parameter],
    cfg,
    train_windows: torch.Tensor,
    sharded: bool,
) -> list[float]:
    """The distillation steps; returns the loss curve. sharded: FSDP sums the trained shards' gradients."""
    optimizer = torch.optim.AdamW(trained.values(), lr=cfg.lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, cfg.steps)
    device = next(student.parameters()).device
    losses: list[float] = []
    with stepper("Healing", cfg.steps) as step:
        for s in range(cfg.steps):
            # data parallel: this process's share of the global batch, its mean weighted by the share
            batch, weight = data_parallel.share(cycled_batch(train_windows, s, cfg.batch_size))
            batch = batch.to(device)
            with torch.no_grad():
                target = _logits(teacher, batch)
            loss = _kl(target, _logits(student, batch)) * weight
            del target
            # FSDP sums the sharded tensors' gradients itself
            value = take_step(loss, optimizer, schedule, [] if sharded else trained.values())
            losses.append(round(value, 5))
            step(f"KL {value:.4f}")
    return losses


def heal_(
    student: nn.Module,
    teacher: nn.Module,
    cfg,
    windows: torch.Tensor,
    removed: list[int] | None,
    n_teacher: int,
    sharded: bool = False,
) -> dict:
    """Distil in place; returns the report. windows: [N, T] training windows plus VALIDATION_WINDOWS held
    out at the end. sharded (FSDP): the steps and the held-out checks run on sharded copies of both models."""
    if len(windows) <= VALIDATION_WINDOWS:
        raise UserError(f"heal needs more than {VALIDATION_WINDOWS} calibration windows")
    train_windows, held_out = windows[:-VALIDATION_WINDOWS], windows[-VALIDATION_WINDOWS:]
    near = gap_neighbours(removed, n_teacher) if removed else []
    paths = trainable_modules(student, cfg.train, near)
    was_training, grad_was = student.training, {id(p): p.requires_grad for p in student.parameters()}
    student.eval()  # no dropout: the student should match the teacher's deterministic outputs
    try:
        trained = _detach_parameters_(student, paths)
        data_parallel.same_start_(trained.values(), "tensors")
        before = {name: p.detach().clone() for name, p in trained.items()}
        copies = sharding.training_copies([student, teacher], trained, sharded=sharded)
        with copies as ((run_student, run_teacher), shards):
            kl_before = _held_out_kl(run_student, run_teacher, held_out, sharded)
            losses = _train_(run_student, run_teacher, shards, cfg, train_windows, sharded)
            kl_after = _held_out_kl(run_student, run_teacher, held_out, sharded)
        kept = kl_after <= kl_before
        if not kept:
            with torch.no_grad():
                for name, p in trained.items():
                    p.copy_(before[name])
    finally:
        for p in student.parameters():
            p.requires_grad_(grad_was.get(id(p), True))
        student.train(was_training)
    return {
        "steps": cfg.steps,
        "tokens": cfg.steps * cfg.batch_size * windows.shape[1],
        "removed_layers": list(removed or []),
        "trained_layers": near,
        "trained_modules": paths,
        "trained_parameters": {n: p.numel() for n, p in trained.items()},
        "trained_parameter_count": sum(p.numel() for p in trained.values()),
        "loss_curve": losses,
        "held_out_kl_before": round(kl_before, 6),
        "held_out_kl_after": round(kl_after, 6),
        "kept": kept,
    }


def shared_copy(model: nn.Module) -> nn.Module:
    """A second module tree over the same tensors (no extra weight memory), e.g. the teacher before pruning.

    Safe while later passes only drop modules from the other tree (prune); heal gives the tensors it
    trains fresh copies, so the teacher keeps the old values.
    """
    import copy

    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def match_removed(student: nn.Module, teacher: nn.Module) -> list[int] | None:
    """Teacher layers the student lacks, found by equal q_proj weights in order; None if some student layer
    has no match."""
    spec = arch_for(student)
    prints = [get_submodule(layer, spec.q_proj).weight for layer in decoder_layers(teacher)]
    found, j = [], 0
    for layer in decoder_layers(student):
        w = get_submodule(layer, spec.q_proj).weight
        while j < len(prints) and not (prints[j].shape == w.shape and torch.equal(prints[j].to(w.device), w)):
            j += 1
        if j == len(prints):
            return None
        found.append(j)
        j += 1
    return [i for i in range(len(prints)) if i not in set(found)]


def heal_loaded_(
    loaded,
    cfg,
    windows: torch.Tensor,
    load,
    pending_passes: list[dict] | None = None,
    sharded: bool = False,
) -> dict:
    """Resolve teacher and removed layers for a loaded student, then `heal_` it in place.

    The teacher is cfg.teacher if given, else `loaded.original` (the model as loaded before this run's
    passes), else the history's source; `load(spec)` loads it as the job loads its model (dtype, device,
    trust). Removed layers: cfg.removed, else the history (including this run's `pending_passes`), else found
    by matching weights.
    """
    student = loaded.model
    teacher = loaded.original if not cfg.teacher else None
    teacher_id = cfg.teacher or ("the input model" if teacher is not None else None)
    if teacher is None:  # the teacher's folder, vocabulary and architecture were checked with the pass
        teacher_id = cfg.teacher or loaded.history["source"]["id"]
        teacher = load(teacher_id).model
    n_teacher, n_student = len(decoder_layers(teacher)), len(decoder_layers(student))
    history = {"passes": list(loaded.history.get("passes", [])) + list(pending_passes or [])}
    removed: list[int] | None = list(cfg.removed) if cfg.removed is not None else None
    if removed is None:
        found = removed_from_history(history)
        removed = found[0] if found and found[1] == n_teacher else match_removed(student, teacher)
    if removed is None:
        if n_teacher != n_student:
            raise UserError(
                f"cannot tell which of the teacher's {n_teacher} layers the student's {n_student} are; give --removed"
            )
        removed = []
    if n_student + len(removed) != n_teacher or any(not 0 <= i < n_teacher for i in removed):
        raise UserError(
            f"the teacher has {n_teacher} layers, the student {n_student}: removing {sorted(removed)} does not match"
        )
    train = cfg.train
    if not removed and "mlp-near-gaps" in train:
        train = tuple(dict.fromkeys(("all-mlp" if t == "mlp-near-gaps" else t) for t in train))
    teacher.eval()
    report = heal_(
        student,
        teacher,
        cfg.model_copy(update={"train": train}),
        windows,
        removed,
        n_teacher,
        sharded,
    )
    return report | {"teacher": teacher_id, "calibration_tokens": int(windows.numel())}
