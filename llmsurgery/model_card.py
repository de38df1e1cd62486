"""The README.md written into every output folder: what was done to the model, how it scores, how to run it.

Read from the folder's history (`llmsurgery_history.json`): the source and its hash, each pass with its settings and
the short figures of its report, the evaluation rows when `--eval` ran (the runner keeps them in the last pass
record under "eval"), how to load it (stock class, or `trust_remote_code` for llmsurgery's runtime) and how to
export it to GGUF for llama.cpp / ollama (or why it cannot be).
"""

from __future__ import annotations

import math


def model_card(history: dict, config: dict, history_file: str) -> str:
    """The card's markdown for a folder with this history (saved as `history_file`) and config.json."""
    src = history.get("source") or {}
    passes = history.get("passes") or []
    tags = ["llmsurgery", *dict.fromkeys(p["pass"] for p in passes)]
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [{', '.join(tags)}]",
        "---",
        "# Transformed with llmsurgery",
        "",
        f"Source: `{src.get('id')}` (sha256 `{src.get('sha256', src.get('revision'))}`)",
        f"Architecture: `{config.get('model_type')}`, {config.get('num_hidden_layers')} layers.",
        "",
        *_passes_table(passes),
        *_evaluation(passes),
        *_loading(config),
        *_exporting(config),
        f"Full history: `{history_file}`.",
        "",
    ]
    return "\n".join(lines)


def _settings(config: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in config.items():
        if isinstance(value, dict):
            found += _settings(value, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key}={value}")
    return found


def _figures(report: dict) -> list[str]:
    """The short figures of a pass report (numbers, words, short lists); long curves and score lists are left to
    the history file."""
    found = []
    for key, value in (report or {}).items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float):
            found.append(f"{key}={value:.4g}")
        elif isinstance(value, (int, str)):
            found.append(f"{key}={value}")
        elif isinstance(value, list) and len(value) <= 12 and all(isinstance(v, (int, str)) for v in value):
            found.append(f"{key}={value}")
    return found


def _passes_table(passes: list[dict]) -> list[str]:
    lines = ["| # | pass | seconds | settings | result |", "|---|------|---------|----------|--------|"]
    for i, entry in enumerate(passes, 1):
        settings = ", ".join(_settings(entry.get("config") or {}))
        figures = ", ".join(_figures(entry.get("report") or {}))
        lines.append(f"| {i} | {entry['pass']} | {entry['seconds']} | {settings} | {figures} |")
    if not passes:
        lines.append("| - | (none: converted only) | | | |")
    return [*lines, ""]


def _evaluation(passes: list[dict]) -> list[str]:
    rows = next((p["eval"] for p in reversed(passes) if p.get("eval")), None)
    if not rows:
        return []
    lines = [
        "## Evaluation (`--eval`)",
        "",
        "| task | metric | this model | original | ratio |",
        "|------|--------|------------|----------|-------|",
    ]
    for row in rows:
        cells = [row.get("value"), row.get("baseline"), row.get("ratio")]
        shown = ["-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}" for v in cells]
        lines.append(f"| {row.get('task')} | {row.get('metric')} | {' | '.join(shown)} |")
    return [*lines, ""]


def _loading(config: dict) -> list[str]:
    if config.get("auto_map"):
        how, note = (
            "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
            ("It needs the modeling code written beside the weights (llmsurgery's runtime):"),
        )
    else:
        how, note = "AutoModelForCausalLM.from_pretrained(path)", "Load it with stock transformers:"
    lines = [
        "## Loading",
        "",
        note,
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        f"model = {how}",
        "```",
        "",
    ]
    layouts = config.get("attention_layout") or []
    if any(layout.get("k") for layout in layouts):
        lines += [
            "For long-range recall, project only the context the cache keeps (the prefill attends exactly, the "
            "tokens after it keep exact keys): `from_pretrained(path, trust_remote_code=True, "
            "project_context_only=True)`; a keys-only model (`--keys-only`) needs it most, and keeps more with "
            "`exact_recent=16` as well: the keys of the context's last 16 tokens stay exact (llmsurgery README, "
            "MatryoshkaKV).",
            "",
        ]
    if any(layout.get("v_exact") for layout in layouts):
        lines += [
            "This model keeps its unprojected v_proj/o_proj too (`--exact-values`): with "
            "`project_context_only=True` the values are exact as the keys are, only the context's cached ones "
            "projected; without it they go unused.",
            "",
        ]
    return lines


def _exporting(config: dict) -> list[str]:
    from .gguf_rules import export_blocker

    lines = ["## Running it in llama.cpp / ollama", ""]
    why = export_blocker(config)
    if why is not None:
        return [*lines, f"This model cannot be exported to GGUF: {why}.", ""]
    return [
        *lines,
        "```sh",
        "llmsurgery export path/to/this/folder --format gguf --outtype q8_0 --output model.gguf",
        "llama-cli -m model.gguf -p 'Hello'          # llama.cpp",
        "printf 'FROM ./model.gguf\\n' > Modelfile && ollama create mymodel -f Modelfile && ollama run mymodel",
        "```",
        "",
    ]
