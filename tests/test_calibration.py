import json

import pytest
import torch
from conftest import build_tokenizer

from llmsurgery.builtin_tasks import build_cloze_items, task_dir
from llmsurgery.calibration import CalibConfig, calibration_batches
from llmsurgery.corpora import (
    builtin_documents,
    calibration_documents,
    evaluation_documents,
    source_documents,
    source_parts,
)
from llmsurgery.errors import UserError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("corpus", ["news", "pydoc"])
def test_calibration_and_evaluation_parts_never_overlap(corpus):
    calib, held_out = calibration_documents(corpus), evaluation_documents(corpus)
    assert held_out and len(calib) >= 0.7 * len(builtin_documents(corpus)) - len(held_out)
    assert not set(calib) & set(held_out)
    calib_text = "\n".join(calib)
    sentences = [s.strip() for d in held_out for s in d.split(". ") if len(s.strip()) > 60]
    assert not [s for s in sentences if s in calib_text]


def test_news_corpus_is_the_lee_articles():
    assert (
        len(builtin_documents("news")) == 293 and len(evaluation_documents("news")) == 58
    )  # 300 lines, 7 repeats


def test_same_options_same_batches(tokenizer):
    cfg = CalibConfig(source="news", samples=4, seq_len=64, seed=3)
    a, b = calibration_batches(tokenizer, cfg), calibration_batches(tokenizer, cfg)
    assert a.shape == (4, 64) and torch.equal(a, b)
    assert (a[:, 0] == tokenizer.bos_token_id).all()
    assert not torch.equal(a, calibration_batches(tokenizer, cfg.model_copy(update={"seed": 4})))


def test_too_many_samples_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="fewer than the"):
        calibration_batches(tokenizer, CalibConfig(source="pydoc", samples=100000, seq_len=512))


def test_local_text_sources(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first paragraph\n\nsecond paragraph\n")
    assert source_documents(str(txt)) == ["first paragraph", "second paragraph"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    assert source_documents(str(jsonl)) == ["a", "b"]
    jsonl.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(UserError, match="c.jsonl:2"):
        source_documents(str(jsonl))


def test_sources_joined_with_plus_mix_their_documents(tmp_path):
    mixed = source_documents("news+pydoc")
    assert mixed == calibration_documents("news") + calibration_documents("pydoc")
    assert not set(mixed) & set(evaluation_documents("news") + evaluation_documents("pydoc"))
    notes = tmp_path / "my+notes.txt"  # a file whose own name holds a +: one source
    notes.write_text("first paragraph\n\nsecond paragraph\n")
    assert source_documents(str(notes)) == ["first paragraph", "second paragraph"]
    assert source_documents(f"{notes}+pydoc") == [
        "first paragraph",
        "second paragraph",
    ] + calibration_documents("pydoc")
    assert source_parts("hf:name:train+validation") == ["hf:name:train+validation"]  # a hub split union
    assert source_parts("news+hf:name:train+validation") == ["news", "hf:name:train+validation"]
    with pytest.raises(ValueError, match="calibration source 'news\\+nope'"):
        CalibConfig(source="news+nope")
    with pytest.raises(ValueError, match="calibration source '/nonexistent/a.txt'"):
        CalibConfig(source="news+/nonexistent/a.txt")


def test_bad_hub_spec_is_a_user_error():
    with pytest.raises(UserError, match="hf:NAME"):
        source_documents("hf:only-a-name")


def test_cloze_items_are_well_formed():
    items = build_cloze_items(evaluation_documents("news"))
    assert len(items) >= 1000  # ~1.4 points of standard error at 75% accuracy
    for item in items[:200]:
        assert len(item["choices"]) == 4 and len({c.lower() for c in item["choices"]}) == 4
        assert 0 <= item["label"] < 4 and item["context"]
    labels = [i["label"] for i in items]
    assert max(labels.count(k) for k in range(4)) < 0.35 * len(items)  # answers are not in one position


def test_rendered_task_yamls_point_at_data():
    folder = task_dir()
    for name in ("news_ppl", "pydoc_ppl", "news_cloze"):
        text = (folder / f"{name}.yaml").read_text()
        assert "@DATA@" not in text and str(folder) in text
