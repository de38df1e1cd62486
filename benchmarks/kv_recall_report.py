"""Tables, the closing lines and the picture of benchmarks/kv_recall.py, from its JSON results alone.

A result is one model's dict: "tasks", "lengths", "budgets", "usable" (the "task@length" cells where the dense
model scores at least "min_dense"; the methods run there, and the closing lines average them), "methods" (each:
side, label, budget, ppl, cells {"task@length": {"match": [...], "ll": [...], "b": [...]}}, with "bw" as well on a
model with sliding-window layers: the share of a windowed cache) and the fixed facts
(projection overhead, training, budgets reached). `python benchmarks/kv_recall.py --report R.json` prints them
again (and draws them with --plot).
"""

from __future__ import annotations

from pathlib import Path

from kv_recall_tasks import bootstrap_mean_of_cells


def _mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def cells_of(m: dict, keys) -> list[dict]:
    return [m["cells"][k] for k in keys if k in m["cells"]]


def score(m: dict, keys) -> tuple[float, float]:
    """(mean string_match_all, mean answer log-likelihood) over the cells `keys` ("task@length"), equally weighted."""
    cells = cells_of(m, keys)
    return _mean([_mean(c["match"]) for c in cells]), _mean([_mean(c["ll"]) for c in cells])


def best(methods: list[dict], keys) -> dict | None:
    scored = [m for m in methods if cells_of(m, keys)]
    return max(scored, key=lambda m: score(m, keys)) if scored else None


def _cell_text(m: dict | None, keys) -> str:
    cells = cells_of(m, keys) if m else []
    if not cells:
        return ""
    match, ll = score(m, keys)
    lo, hi = bootstrap_mean_of_cells([c["match"] for c in cells])
    b = _mean([_mean(c["b"]) for c in cells])
    text = f"{match:.1f} [{lo:.0f},{hi:.0f}] {ll:.2f} b={b:.3f}"
    if all("bw" in c for c in cells):  # a model with sliding-window layers: the share of a windowed cache too
        text += f" bw={_mean([_mean(c['bw']) for c in cells]):.3f}"
    return text


def _find(methods, label, budget):
    return next((m for m in methods if m["label"] == label and m["budget"] == budget), None)


def _budget_table(title: str, budgets, labels, cell, methods):
    """A table of one row per method label and one column per budget; `cell(entry or None)` fills it."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("method")
    for b in budgets:
        table.add_column(f"b={b:g}", justify="right")
    for label in labels:
        table.add_row(label, *[cell(_find(methods, label, b)) for b in budgets])
    return table


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console, name = Console(width=220), result["model"]
    methods, tasks, budgets = result["methods"], result["tasks"], result["budgets"]
    labels = list(dict.fromkeys(m["label"] for m in methods))
    dense = methods[0]
    samples = max((len(c["match"]) for c in dense["cells"].values()), default=0)
    table = Table(title=f"{name}: dense string_match_all per task and length ({samples} samples a cell)")
    table.add_column("length")
    for t in tasks:
        table.add_column(t, justify="right")
    for n in result["lengths"]:
        table.add_row(str(n), *[_cell_text(dense, [f"{t}@{n}"]).split(" b=")[0] for t in tasks])
    console.print(table)
    for n in result["lengths"]:
        keys = [f"{t}@{n}" for t in tasks if f"{t}@{n}" in result.get("usable", [])]
        if not keys or len(methods) == 1:
            continue
        title = (
            f"{name}, {n} context tokens: string_match_all over {', '.join(k.split('@')[0] for k in keys)} "
            f"x {samples} samples [95% CI], answer log-likelihood per token, b measured on the live cache"
        )
        console.print(
            _budget_table(title, budgets, labels[1:], lambda m, keys=keys: _cell_text(m, keys), methods)
        )
        per_task = Table(title=f"{name}, {n} tokens, per task: the best of each side at each budget")
        per_task.add_column("method")
        for k in keys:
            per_task.add_column(k.split("@")[0], justify="right")
        per_task.add_row("dense", *[f"{_mean(dense['cells'][k]['match']):.1f}" for k in keys])
        for b in budgets:
            for side in ("kvpress", "llmsurgery"):
                m = best([x for x in methods if x["side"] == side and x["budget"] == b], keys)
                if m:
                    row = [f"{_mean(m['cells'][k]['match']):.1f}" if k in m["cells"] else "" for k in keys]
                    per_task.add_row(f"{side}: {m['label']} @ {b:g}", *row)
        console.print(per_task)
    if dense.get("ppl") is not None:
        blank = result.get("no_context_ppl")  # not yet in a JSON saved in the dense step
        blank_text = f", no context {blank:.2f}" if blank is not None else ""
        title = (
            f"{name}: continuation perplexity ({result['ppl_setup']}; dense {dense['ppl']:.2f}{blank_text})"
        )
        ppl = lambda m: f"{m['ppl']:.2f}" if m and m.get("ppl") else ""  # noqa: E731
        console.print(_budget_table(title, budgets, labels[1:], ppl, methods))
    for line in fact_lines(result):
        print(line)


def fact_lines(result: dict) -> list[str]:
    name, usable = result["model"], result.get("usable", [])
    lines = [
        f"{name}: cells where dense scores >= {result['min_dense']:g} (the methods ran there; the lines below "
        f"average them): {', '.join(usable) if not result.get('fallback') else 'none, so all of them'}"
    ]
    if "machine" in result:
        lines.append(f"{name}: ran on {result['machine']}")
    if "stock_from" in result:
        lines.append(f"{name}: dense and kvpress results taken from {result['stock_from']}")
    if "train" not in result:
        return lines
    train, overhead = result["train"], result["overhead_bytes"]
    keys = ", ".join(f"{k} {v[0] / 2**20:.2f} MiB" for k, v in overhead.items())
    values = max((v[1] for v in overhead.values()), default=0)
    exact = ", ".join(f"{k} {v[2] / 2**20:.2f} MiB" for k, v in overhead.items() if len(v) > 2 and v[2])
    dense = result["dense_bytes_per_token"]
    weights = f"; weights, not KV: the unprojected v_proj/o_proj (--exact-values) {exact}" if exact else ""
    return lines + [
        f"{name}: trained bases: {train['tokens']} training tokens, {train['seconds'] / 60:.1f} min; searched "
        "ranks reach " + ", ".join(f"{k} {v:.4f}" for k, v in result["reached"].items()),
        f"{name}: fixed overhead, not counted in b: key bases and means {keys}; value bases and means (read by "
        f"presses and exact values) up to {values / 2**20:.2f} MiB; the dense cache is {dense} bytes per token, so "
        f"1 MiB is {2**20 / dense:.0f} tokens of it{weights}",
        f"{name}: best eviction press per budget (composed with the trained bases): "
        + str(result.get("best_press", "none (its kvpress step did not run or did not finish)")),
    ]


def summary_lines(result: dict) -> list[str]:
    """One line per budget: the best configuration of each side, averaged over the usable cells."""
    methods, usable = result["methods"], result.get("usable", [])
    if "best_press" not in result:  # a --dense-only run
        return [f"dense {score(methods[0], [k])[0]:.1f} at {k}" for k in methods[0]["cells"]]
    lines = []
    for b in result["budgets"]:
        here = [x for x in methods if x["budget"] == b]
        text = f"b={b:g}:"
        for side in ("llmsurgery", "kvpress"):  # llmsurgery: the kv-compress models, whose memory is real
            m = best([x for x in here if x["side"] == side and not _counted(x)], usable)
            text += f" {side} {score(m, usable)[0]:.1f} ({m['label']})" if m else f" {side} -"
        lines.append(text + _press_note([x for x in here if _counted(x)], usable))
    keys_only = [m for m in methods if m["side"] == "llmsurgery" and m["label"].endswith("keys only")]
    keys, think = best([m for m in keys_only if m["budget"] == 0.75], usable), _find(methods, "think", 0.75)
    if keys and think and cells_of(think, usable):
        presses = [m for m in methods if m["label"].endswith("keys only press") and m["budget"] == 0.75]
        lines.append(
            f"b=0.75 keys only: llmsurgery {score(keys, usable)[0]:.1f} ({keys['label']}, r_k = d/2) "
            f"kvpress {score(think, usable)[0]:.1f} (think, 50% of key channels)"
            + _press_note(presses, usable)
        )
    return lines


def _counted(m: dict) -> bool:
    """A projection press on the stock model: its memory is counted (the r coordinates), not realized."""
    return m["side"] == "llmsurgery" and " press" in m["label"]


def _press_note(presses: list[dict], usable) -> str:
    m = best(presses, usable)
    return f"; as a press, memory counted: {score(m, usable)[0]:.1f} ({m['label']})" if m else ""


def save_plot(results: list[dict], path: Path) -> None:
    """Recall against KV budget: a row per model, a panel per task (its usable lengths) and one for the average;
    one line per method (the composed configurations as one line: the best split at each budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results[0]["tasks"]
    fig, axes = plt.subplots(
        len(results), len(tasks) + 1, figsize=(3.0 * (len(tasks) + 1) + 3, 2.9 * len(results)), squeeze=False
    )
    for row, result in zip(axes, results):
        methods, usable = result["methods"], result.get("usable", [])
        lines: dict = {}
        for m in methods[1:]:
            label = m["label"].split(" p=")[0] + (" + eviction" if " p=" in m["label"] else "")
            lines.setdefault(label, {}).setdefault(m["budget"], []).append(m)
        for ax, task in zip(row, [*tasks, "average"]):
            keys = [k for k in usable if task == "average" or k.split("@")[0] == task]
            for index, (label, by_budget) in enumerate(lines.items()):
                color = plt.get_cmap("tab20")(index % 20)
                points = [
                    (b, max(score(m, keys)[0] for m in ms))
                    for b, ms in sorted(by_budget.items())
                    if any(cells_of(m, keys) for m in ms)
                ]
                if points:  # kv-compress models solid and thick, presses on the stock model dashed
                    model = label.startswith("kv ") and " press" not in label
                    style, width = ("-", 2.4) if model else ("--", 1.0)
                    ax.plot(*zip(*points), style, marker="o", ms=3, lw=width, label=label, color=color)
            if keys:
                ax.axhline(score(methods[0], keys)[0], color="black", lw=0.8, ls=":", label="dense")
            lengths = sorted({int(k.split("@")[1]) for k in keys})
            ax.set_title(f"{Path(result['model']).name}: {task} {lengths or '(dense < bar)'}", fontsize=7)
            ax.set_xlabel("KV budget b (share of the dense context KV)", fontsize=6)
            ax.set_ylim(-3, 103)
            ax.tick_params(labelsize=6)
        row[0].set_ylabel("string_match_all", fontsize=7)
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
