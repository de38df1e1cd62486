"""The offline lm-eval tasks shipped with llmsurgery: held-out data + task YAMLs, rendered once.

The YAMLs live in `llmsurgery/tasks/` with an ``@DATA@`` placeholder; `task_dir()` writes the
held-out documents as JSON lines into the cache and the YAMLs beside them with absolute paths,
so stock ``lm_eval --include_path DIR`` can use the same folder.
"""

from __future__ import annotations

import json
import os
import random
import re
from importlib.resources import files
from pathlib import Path

from .corpora import evaluation_documents
from .sources import cache_dir

BUILTIN_TASKS = ("news_ppl", "pydoc_ppl", "news_cloze")
TASKS_VERSION = "v3"  # bump when the data or YAMLs change
CLOZE_SEED = 1234
CLOZE_CONTEXT_WORDS = 40  # words of passage shown before the gap (at most)
CLOZE_MIN_CONTEXT = 12
CLOZE_SPAN_WORDS = 2  # the true continuation and each distractor are this many words
CLOZE_STRIDE = 10  # one item every this many words of held-out text
CLOZE_CHOICES = 4


def build_cloze_items(docs: list[str], seed: int = CLOZE_SEED) -> list[dict]:
    """Cloze items: a passage, its true next words, and same-length spans drawn from the corpus."""
    rng = random.Random(seed)
    words_per_doc = [re.findall(r"\S+", d) for d in docs]
    pool = [
        ws[i : i + CLOZE_SPAN_WORDS] for ws in words_per_doc for i in range(0, len(ws) - CLOZE_SPAN_WORDS)
    ]
    items = []
    for words in words_per_doc:
        for gap in range(CLOZE_MIN_CONTEXT, len(words) - CLOZE_SPAN_WORDS + 1, CLOZE_STRIDE):
            truth = " ".join(words[gap : gap + CLOZE_SPAN_WORDS])
            choices = {truth.lower(): truth}
            while len(choices) < CLOZE_CHOICES:
                span = " ".join(rng.choice(pool))
                choices.setdefault(span.lower(), span)
            options = list(choices.values())
            rng.shuffle(options)
            context = " ".join(words[max(0, gap - CLOZE_CONTEXT_WORDS) : gap])
            items.append({"context": context, "choices": options, "label": options.index(truth)})
    return items


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def task_dir() -> Path:
    """A folder holding the built-in tasks' YAMLs and data, ready for lm-eval's include_path."""
    target = cache_dir() / "tasks" / TASKS_VERSION
    target.mkdir(parents=True, exist_ok=True)
    if not (target / "news_cloze.jsonl").is_file():
        news, pydoc = evaluation_documents("news"), evaluation_documents("pydoc")
        _write_jsonl(target / "news_eval.jsonl", [{"text": d} for d in news])
        _write_jsonl(target / "pydoc_eval.jsonl", [{"text": d} for d in pydoc])
        _write_jsonl(target / "news_cloze.jsonl", build_cloze_items(news))
    for name in BUILTIN_TASKS:
        template = files("llmsurgery").joinpath("tasks", f"{name}.yaml").read_text(encoding="utf-8")
        rendered = template.replace("@DATA@", str(target))
        path = target / f"{name}.yaml"
        if not path.is_file() or path.read_text(encoding="utf-8") != rendered:
            path.write_text(rendered, encoding="utf-8")
    return target
