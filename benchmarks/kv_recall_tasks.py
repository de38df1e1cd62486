"""RULER-style synthetic long-range recall, built offline (after hsiehjackson/RULER, scripts/synthetic.yaml).

A needle is ``One of the special magic numbers for {key} is: {value}.`` with an adjective-noun key and a 7-digit
value. Tasks (RULER's names in brackets):

* ``filler``: one needle in a repeated filler (niah_single_1);
* ``news`` / ``pydoc``: one needle at one of 11 depths (0%, 10%, ..., 100%, cycling) in real text: the held-out
  news articles, and CPython's help topics as a second domain (niah_single_2);
* ``multikey``: four needles with different keys in news text, one asked (niah_multikey_1);
* ``needles``: a haystack made only of needles, one asked (niah_multikey_2);
* ``multivalue``: four values for one key in news text, all asked (niah_multivalue).

Haystacks come from the evaluation parts of the corpora (llmsurgery.corpora); the projections are calibrated and
trained on the calibration parts, which never overlap them. ``haystack=`` a user's text file replaces both real
texts. Every sample of a (task, length) cell has exactly `length` context tokens, so that a cell runs as one
batch. Score: ``string_match_all`` (share of the expected values found in the greedy answer, x100).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from llmsurgery.errors import UserError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
PREFIX = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n"
)
PREFIX_MANY = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
QUESTION = (
    "What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
QUESTION_ALL = (
    "What are all the special magic numbers for {key} mentioned in the provided text? "
    "The special magic numbers for {key} mentioned in the provided text are"
)
ADJECTIVES = (
    "ancient bitter brave bright calm clever cold crimson curious eager fancy fierce gentle golden hollow humble "
    "icy jolly lazy little lonely loud lucky mellow modern narrow noisy pale patient polite proud quiet rapid "
    "rough royal rusty silent silver sleepy smooth"
).split()
NOUNS = (
    "anchor apple badger banner basket beacon candle canyon castle cedar comet copper cradle desert dolphin "
    "engine falcon feather forest garden glacier hammer harbor helmet island jacket kettle ladder lantern "
    "meadow mirror needle orchard pencil pillow rabbit river rocket saddle violin"
).split()
TASKS = ("filler", "news", "pydoc", "multikey", "needles", "multivalue")
DEPTHS = [i / 10 for i in range(11)]


@dataclass
class Sample:
    context: list[int]  # exactly the cell's length, BOS first
    question: list[int]
    answer: list[int]  # the reference answer's tokens, teacher-forced for the log-likelihood
    values: list[str]  # what string_match_all looks for
    depth: float | None = None


def sentences(docs: list[str]) -> list[str]:
    """Sentences of the documents, in order (split after . ! ? or at blank lines)."""
    out = []
    for doc in docs:
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", doc) if s.strip()]
    return out


class Haystacks:
    """Token-level sentence streams per text source, tokenized once per tokenizer."""

    def __init__(self, tokenizer, texts: dict[str, list[str]]):
        self.tok = tokenizer
        self.units = {name: [self.ids(" " + s) for s in sentences(docs)] for name, docs in texts.items()}
        self.units["filler"] = [self.ids(" " + s) for s in sentences([FILLER])]

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def stream(self, name: str, tokens: int, rng: random.Random) -> list[list[int]]:
        """Consecutive sentences (from a random start, wrapping) holding `tokens` tokens; the last one cut."""
        units, out, total = self.units[name], [], 0
        at = rng.randrange(len(units)) if name != "filler" else 0
        while total < tokens:
            unit = units[at % len(units)][: tokens - total]
            out.append(unit)
            total += len(unit)
            at += 1
        return out


def _key(rng: random.Random, taken: set) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _value(rng: random.Random, taken: set) -> str:
    while True:
        value = str(rng.randint(1_000_000, 9_999_999))
        if value not in taken:
            taken.add(value)
            return value


def _insert(units: list[list[int]], needles: list[list[int]], depths: list[float]) -> list[int]:
    """The units with each needle placed at the sentence boundary nearest its depth (a share of the tokens)."""
    bounds, total = [0], 0
    for unit in units:
        total += len(unit)
        bounds.append(total)
    at_boundary: dict[int, list[list[int]]] = {}
    for needle, depth in zip(needles, depths):
        index = min(range(len(bounds)), key=lambda i: abs(bounds[i] - depth * total))
        at_boundary.setdefault(index, []).append(needle)
    out: list[int] = []
    for i in range(len(units) + 1):
        for needle in at_boundary.get(i, []):
            out += needle
        if i < len(units):
            out += units[i]
    return out


def make_sample(task: str, length: int, index: int, hay: Haystacks, seed: int, text: str = "news") -> Sample:
    """Sample `index` of a (task, length) cell: a context of exactly `length` tokens, a question, the answer."""
    rng = random.Random(f"{seed}/{task}/{length}/{index}")
    keys, values = set(), set()
    key = _key(rng, keys)
    many = task == "multivalue"
    answers = [_value(rng, values) for _ in range(4 if many else 1)]
    needles = [hay.ids(" " + NEEDLE.format(key=key, value=v)) for v in answers]
    depths = [rng.random() for _ in needles]
    if task in ("news", "pydoc"):
        depths = [DEPTHS[index % len(DEPTHS)]]
    if task == "multikey":  # three more needles with other keys, none asked
        for _ in range(3):
            needles.append(hay.ids(" " + NEEDLE.format(key=_key(rng, keys), value=_value(rng, values))))
            depths.append(rng.random())
    order = sorted(range(len(needles)), key=lambda i: depths[i])
    needles, depths = [needles[i] for i in order], [depths[i] for i in order]
    head = [hay.tok.bos_token_id] if hay.tok.bos_token_id is not None else []
    head += hay.ids(PREFIX_MANY if many else PREFIX)
    tail = hay.ids("\n")
    room = length - len(head) - len(tail) - sum(map(len, needles))
    if room < 0:
        raise UserError(
            f"a context of {length} tokens cannot hold the {task} task's instructions and needles"
        )
    if (
        task == "needles"
    ):  # only needles: other keys and values, after a few filler tokens to the exact length
        units, left = [], room
        while True:
            other = hay.ids(" " + NEEDLE.format(key=_key(rng, keys), value=_value(rng, values)))
            if len(other) > left:
                break
            units.append(other)
            left -= len(other)
        units = (hay.stream("filler", left, rng) if left else []) + units
    else:
        source = {"filler": "filler", "pydoc": "pydoc"}.get(task, text)
        units = hay.stream(source, room, rng)
    context = head + _insert(units, needles, depths) + tail
    assert len(context) == length, (task, len(context), length)
    reference = ", ".join(answers)
    return Sample(
        context=context,
        question=hay.ids(QUESTION_ALL.format(key=key) if many else QUESTION.format(key=key)),
        answer=hay.ids(" " + reference),
        values=answers,
        depth=depths[0] if task in ("news", "pydoc") else None,
    )


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's metric: the share of references found in the prediction (case-insensitive), x100."""
    text = prediction.lower()
    return 100.0 * sum(r.lower() in text for r in references) / len(references)


def bootstrap_ci(values: list[float], reps: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling the samples."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return (float(data.mean()), float(data.mean())) if len(data) else (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(reps, len(data)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def bootstrap_mean_of_cells(cells: list[list[float]], reps: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean over cells (tasks) of each cell's mean, resampling within each cell."""
    import numpy as np

    rng = np.random.default_rng(seed)
    means = np.zeros(reps)
    for values in cells:
        data = np.asarray(values, dtype=np.float64)
        means += data[rng.integers(0, len(data), size=(reps, len(data)))].mean(1) / len(cells)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
