"""Layer-score pictures: a terminal bar chart (rich) and a PNG (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

BAR_WIDTH = 40


def score_table(scores: list[float], chosen: list[int], label: str, index_label: str) -> Table:
    """One row per score with a bar; rows whose index is in `chosen` are marked."""
    table = Table(title=f"{label} (0-based; ✗ = would be removed)")
    for column in (index_label, label, "", ""):
        table.add_column(column, justify="right" if column == index_label else "left")
    top = max(max(scores), 1e-12)
    for i, score in enumerate(scores):
        mark = "✗" if i in chosen else ""
        bar = "█" * max(1, round(BAR_WIDTH * max(score, 0) / top))
        style = "red" if mark else "cyan"
        table.add_row(str(i), f"{score:.5f}", f"[{style}]{bar}[/{style}]", mark)
    return table


def save_score_plot(path: Path, scores: list[float], chosen: list[int], label: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(scores) * 0.3), 3.5))
    colors = ["tab:red" if i in chosen else "tab:blue" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set_xlabel(f"{xlabel} (0-based; red = removed)")
    ax.set_ylabel(label)
    ax.set_xticks(range(len(scores)))
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_spectra_plot(path: Path, layers: list[dict], title: str) -> None:
    """Per layer, each KV head's singular values (normalised to its largest), the kept ones solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(6, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), squeeze=False, sharey=True)
    for ax, row in zip(axes.flat, layers):
        for spectrum, kept in zip(row["spectra"], row["v_after"]):
            top = max(spectrum[0], 1e-30)
            values = [max(v / top, 1e-8) for v in spectrum]
            ax.semilogy(range(kept), values[:kept], lw=1)
            ax.semilogy(range(kept - 1, len(values)), values[kept - 1 :], lw=1, ls=":", color="gray")
        ax.set_title(f"layer {row['layer']}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
