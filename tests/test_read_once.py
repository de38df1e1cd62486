"""A job reads each of its inputs once: on SmolLM2, every safetensors header is read once, the tokenizer loads
once and each calibration source is tokenized once, whole-model and streamed (the runner's `Plan` carries
them from the checks to loading, calibration and saving)."""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import run_cli

import llmsurgery.calibration
import llmsurgery.checkpoint
import llmsurgery.sources
from llmsurgery.sources import local_folder, resolve_source

pytestmark = pytest.mark.real
SMALL = ["--calib-samples", "2", "--calib-seq-len", "64"]


@pytest.fixture
def reads(monkeypatch):
    """Counters of what the job reads: headers (by file), tokenizer loads, tokenized sources, hashed files."""
    from transformers import AutoTokenizer

    found = {"headers": Counter(), "tokenizers": 0, "streams": 0, "hashes": 0}
    header, tokenizer = llmsurgery.checkpoint.safetensors_header, AutoTokenizer.from_pretrained.__func__
    stream, digest = llmsurgery.calibration.token_stream, llmsurgery.sources.sha256_files

    def count_header(path):
        found["headers"][str(path)] += 1
        return header(path)

    def count_tokenizer(cls, *args, **kwargs):
        found["tokenizers"] += 1
        return tokenizer(cls, *args, **kwargs)

    def count_stream(*args, **kwargs):
        found["streams"] += 1
        return stream(*args, **kwargs)

    def count_digest(paths):
        found["hashes"] += 1
        return digest(paths)

    local_folder(resolve_source("smollm2-135m"))  # converted before counting (once per cache)
    monkeypatch.setattr(llmsurgery.checkpoint, "safetensors_header", count_header)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(count_tokenizer))
    monkeypatch.setattr(llmsurgery.calibration, "token_stream", count_stream)
    monkeypatch.setattr(llmsurgery.sources, "sha256_files", count_digest)
    monkeypatch.setattr("llmsurgery.model_io.sha256_files", count_digest)
    return found


def test_a_whole_model_job_reads_each_input_once(reads, tmp_path):
    """prune then heal (two windows sets drawn from one source, the teacher shared in memory)."""
    heal = ["--heal", "--heal-steps", "1", "--heal-calib-samples", "1", "--heal-calib-seq-len", "64"]
    result = run_cli(
        "prune", "--bi", "smollm2-135m", "--remove", "2", *SMALL, *heal, "--output", tmp_path / "o"
    )
    assert result.exit_code == 0, result.output
    assert reads["headers"] and set(reads["headers"].values()) == {1}, reads["headers"]
    assert reads["tokenizers"] == 1 and reads["streams"] == 1, reads
    assert reads["hashes"] == 0  # a built-in: its source record names it, nothing to hash


def test_a_streamed_job_reads_each_input_once(reads, tmp_path):
    """A plain safetensors folder, streamed: its weights are hashed once for the history."""
    folder = tmp_path / "plain"
    folder.mkdir()
    source = local_folder(resolve_source("smollm2-135m"))
    for item in source.iterdir():
        if item.name != "llmsurgery_source.json":
            (folder / item.name).symlink_to(item)
    result = run_cli(
        "prune", "--bi", folder, "--remove", "2", *SMALL, "--stream", "on", "--output", tmp_path / "o"
    )
    assert result.exit_code == 0, result.output
    assert "(streamed)" in result.output
    assert reads["headers"] and set(reads["headers"].values()) == {1}, reads["headers"]
    assert reads["tokenizers"] == 1 and reads["streams"] == 1 and reads["hashes"] == 1, reads
