"""Bad input: one readable line, exit 2, no output written, inputs untouched."""

import json
import shutil

import pytest
from conftest import folder_digest
from helpers import run_cli


def _one_error_line(result):
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def broken_models(tiny_models, tmp_path):
    src = tiny_models["llama"]
    no_config = tmp_path / "no_config"
    shutil.copytree(src, no_config)
    (no_config / "config.json").unlink()
    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage = tmp_path / "garbage"
    shutil.copytree(src, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    unsupported = tmp_path / "unsupported"
    shutil.copytree(src, unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(
        json.dumps(config | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    return {"no_config": no_config, "truncated": truncated, "garbage": garbage, "unsupported": unsupported}


@pytest.mark.parametrize(
    "case,message",
    [
        ("no_config", "no config.json"),
        ("truncated", "truncated"),
        ("garbage", "corrupt"),
        (
            "unsupported",
            "unsupported architecture 'gpt2'; supported: gemma3_text, llama, mistral, qwen2, qwen3",
        ),
    ],
)
@pytest.mark.parametrize("command", ["convert", "prune"])
def test_bad_models(broken_models, tmp_path, case, message, command):
    model = broken_models[case]
    before = folder_digest(model)
    out = tmp_path / "out"
    extra = ["--remove", "1", "--calib-samples", "2", "--calib-seq-len", "32"] if command == "prune" else []
    line = _one_error_line(run_cli(command, model, "--output", out, *extra))
    assert message in line
    assert not out.exists() and folder_digest(model) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_path(tmp_path):
    line = _one_error_line(run_cli("convert", tmp_path / "nope", "--output", tmp_path / "out"))
    assert "no such file or folder" in line and not (tmp_path / "out").exists()


def test_missing_path_eval_and_inspect(tmp_path):
    _one_error_line(run_cli("eval", tmp_path / "nope", "--tasks", "news_ppl"))
    _one_error_line(run_cli("inspect", tmp_path / "nope"))


def test_unknown_task(tiny_models):
    line = _one_error_line(run_cli("eval", tiny_models["llama"], "--tasks", "news_ppl,no_such_task_xyz"))
    assert "unknown task(s): no_such_task_xyz" in line


def test_existing_output(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    line = _one_error_line(run_cli("convert", tiny_models["llama"], "--output", out))
    assert "already exists" in line and (out / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--remove", "6"], "cannot remove 6 of 6 layers"),
        (["--remove", "60"], "cannot remove 60 of 6 layers"),
        (["--remove", "0"], "greater than or equal to 1"),
        (["--remove", "-2"], "greater than or equal to 1"),
        (["--ratio", "1.5"], "less than 1"),
        (["--ratio", "0"], "greater than 0"),
        (["--remove", "1", "--ratio", "0.2"], "exactly one of remove and ratio"),
        ([], "exactly one of remove and ratio"),
        (["--remove", "1", "--metric", "cosine"], "--metric: Input should be 'bi' or 'angular'"),
        (["--remove", "1", "--metric", "angular"], "--block"),
        (["--remove", "1", "--calib", "nonexistent_corpus"], "calibration source 'nonexistent_corpus'"),
    ],
)
def test_bad_prune_amounts(tiny_models, tmp_path, args, message):
    out = tmp_path / "out"
    line = _one_error_line(
        run_cli(
            "prune",
            "--bi",
            tiny_models["llama"],
            "--output",
            out,
            "--calib-samples",
            "2",
            "--calib-seq-len",
            "32",
            *args,
        )
    )
    assert message in line and not out.exists()


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "inspect", tmp_path / "nope")
    assert result.exit_code == 2 and "Traceback" in result.output


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.exit_code == 0
    for command in ("eval", "convert", "inspect", "prune"):
        assert command in result.output


def test_usage_errors_are_one_line_too():
    import subprocess
    import sys

    for args in (["prune", "--bi", "smollm2-135m", "--remove", "abc", "-o", "x"], ["evl"]):
        proc = subprocess.run(
            [sys.executable, "-c", "from llmsurgery.cli import run; run()", *args],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
