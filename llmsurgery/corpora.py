"""Text sources for calibration and evaluation.

Built-in corpora ship inside packages, so they work offline:

* ``news``: gensim's ``test_data/lee_background.cor`` (300 news articles, one per line; repeated
  articles are dropped, so no text sits on both sides of the split).
* ``pydoc``: CPython's ``pydoc_data.topics`` (the help topics, one document per topic, sorted).

Each built-in corpus is split by document index: documents whose index is ``4 mod 5`` form the
evaluation part (used by the ``news_*`` / ``pydoc_*`` lm-eval tasks), every other document the
calibration part (used by passes). The two never overlap.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import defaults
from .errors import UserError, first_line

BUILTIN_CORPORA = ("news", "pydoc")
EVAL_EVERY = 5  # every 5th document (index % 5 == 4) is held out for evaluation


def _gensim_lee_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the 'news' corpus needs gensim: pip install gensim")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        raise UserError(f"gensim is installed but {path} is missing; reinstall gensim")
    return path


def _news_documents() -> list[str]:
    text = _gensim_lee_path().read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]


def builtin_documents(name: str) -> list[str]:
    """All distinct documents of a built-in corpus, in a fixed order (the Lee corpus repeats some)."""
    if name == "news":
        return list(dict.fromkeys(_news_documents()))
    if name == "pydoc":
        return list(dict.fromkeys(_pydoc_documents()))
    raise UserError(f"unknown built-in corpus '{name}'; built-in corpora: {', '.join(BUILTIN_CORPORA)}")


def _long_sentences(doc: str) -> list[str]:
    return [s.strip() for s in re.split(r"\.\s|\n\n", doc) if len(s.strip()) > 60]


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """(calibration part, evaluation part), split by document index.

    Calibration documents that repeat any long sentence of the evaluation part are dropped
    (pydoc topics quote each other; the Lee corpus holds near-duplicate articles).
    """
    held_out = [d for i, d in enumerate(docs) if i % EVAL_EVERY == EVAL_EVERY - 1]
    held_sentences = [s for d in held_out for s in _long_sentences(d)]
    calib = [
        d
        for i, d in enumerate(docs)
        if i % EVAL_EVERY != EVAL_EVERY - 1 and not any(s in d for s in held_sentences)
    ]
    return calib, held_out


def calibration_documents(name: str) -> list[str]:
    return split_documents(builtin_documents(name))[0]


def evaluation_documents(name: str) -> list[str]:
    return split_documents(builtin_documents(name))[1]


def _read_text_file(path: Path) -> str:
    """A calibration file's text, refused when it is not text: binary, not UTF-8, or control characters."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read calibration file {path}: {exc.strerror}") from None
    if b"\x00" in raw:
        raise UserError(f"calibration file {path} is binary, not text (it holds NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"calibration file {path} is not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from None
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\n\r\t\f")
    if controls > max(2, len(text) // 100):
        raise UserError(f"calibration file {path} does not look like text ({controls} control characters)")
    return text


def _file_documents(path: Path) -> list[str]:
    text = _read_text_file(path)
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}:{lineno}: each line needs a string field 'text'")
            docs.append(record["text"])
    elif path.suffix == ".txt":
        docs = [p.strip() for p in text.split("\n\n")]
    else:
        raise UserError(f"calibration file {path} must end in .txt or .jsonl")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"calibration file {path} holds no text")
    return docs


@functools.lru_cache(maxsize=16)
def _checked_file_documents(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    return tuple(_file_documents(Path(path)))


def file_documents(path: Path) -> list[str]:
    """The documents of a .txt/.jsonl calibration file, checked once per version of the file."""
    stat = path.stat()
    return list(_checked_file_documents(str(path), stat.st_mtime_ns, stat.st_size))


def _hub_documents(spec: str) -> list[str]:
    """``hf:NAME[@CONFIG]:SPLIT[:FIELD]`` through the datasets library (needs the internet)."""
    parts = spec[len("hf:") :].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"hub dataset spec '{spec}' must look like hf:NAME[@CONFIG]:SPLIT[:FIELD]")
    name, _, config = parts[0].partition("@")
    split, field = parts[1], parts[2] if len(parts) == 3 else "text"
    try:
        import datasets

        data = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - network, missing dataset, bad split: one line for all
        first = first_line(exc)
        raise UserError(f"could not load hub dataset '{spec}' (offline?): {first}") from None
    if field not in data.column_names:
        raise UserError(
            f"hub dataset '{spec}' has no column '{field}'; columns: {', '.join(data.column_names)}"
        )
    return [t for t in data[field] if isinstance(t, str) and t.strip()]


def _starts_a_source(piece: str) -> bool:
    path = Path(piece).expanduser()
    return (
        piece in BUILTIN_CORPORA
        or piece.startswith("hf:")
        or path.is_file()
        or path.suffix in (".txt", ".jsonl")
    )


def source_parts(source: str) -> list[str]:
    """The sources a ``--calib`` value mixes: ``news+pydoc`` names two, each drawn in proportion to its tokens. A
    ``+`` joins two sources only where a source starts after it (a built-in name, ``hf:``, a .txt/.jsonl file), so a
    file whose own name holds a ``+`` or a hub split union (``hf:NAME:train+validation``) stays one source."""
    pieces, parts, i = source.split("+"), [], 0
    while i < len(pieces):
        # the longest run of pieces that names an existing file, else up to the next piece that starts a source
        end = next((j for j in range(len(pieces), i, -1) if _is_file("+".join(pieces[i:j]))), None)
        if end is None:
            end = i + 1
            while end < len(pieces) and not _starts_a_source(pieces[end]):
                end += 1
        parts.append("+".join(pieces[i:end]))
        i = end
    return parts


def _is_file(piece: str) -> bool:
    return bool(piece) and Path(piece).expanduser().is_file()


def check_source(source: str) -> None:
    """Fail early (before any model loads) on a calibration source that cannot work."""
    parts = source_parts(source)
    if len(parts) > 1:
        for part in parts:
            check_source(part)
        return
    if source in BUILTIN_CORPORA or (source.startswith("hf:") and len(source[3:].split(":")) in (2, 3)):
        return
    path = Path(source).expanduser()
    if not path.is_file() or path.suffix not in (".txt", ".jsonl"):
        raise UserError(
            f"calibration source '{source}' is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}), "
            "an existing .txt/.jsonl file, nor hf:NAME[@CONFIG]:SPLIT[:FIELD] (join several with +)"
        )
    file_documents(path)  # readable text with at least one document


def source_documents(source: str) -> list[str]:
    """Calibration documents for ``--calib``: a built-in name, a .txt/.jsonl file, or hf:...; or several of them
    joined with ``+``, their documents in that order."""
    if len(parts := source_parts(source)) > 1:
        return [doc for part in parts for doc in source_documents(part)]
    if source in BUILTIN_CORPORA:
        return calibration_documents(source)
    if source.startswith("hf:"):
        return _hub_documents(source)
    check_source(source)
    return file_documents(Path(source).expanduser())


class CalibConfig(BaseModel):
    """Which token windows a pass draws: source, count, length and the seed choosing them."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    source: str = "news"
    samples: int = Field(8, gt=0, le=defaults.MAX_WINDOWS)
    seq_len: int = Field(512, gt=1, le=defaults.MAX_SEQ_LEN)
    seed: int = Field(0, ge=0, lt=defaults.MAX_SEED)

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        try:
            check_source(value)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return value
