"""One description per pass and one runner: `llmsurgery PASS` and the equivalent recipe write the same model.

On the real small model, for every pass: the sha256 of every weight file and the history (but timings)
are the same whether the pass ran from its command or from a recipe spelling the same options.
"""

import hashlib
import json

import pytest
import torch
import yaml
from helpers import run_cli, stock_load

from llmsurgery.model_io import load_model

pytestmark = pytest.mark.real
SMALL = {"calib-samples": 2, "calib-seq-len": 64}
PROMPT = "The prime minister said on Tuesday that the government"

# pass command arguments, the same settings as recipe passes
CASES = {
    "prune": (["prune", "--bi", "--remove", "4"], [{"pass": "prune-bi", "remove": 4}]),
    "prune-heal": (
        [
            "prune",
            "--bi",
            "--remove",
            "4",
            "--heal",
            "--heal-steps",
            "3",
            "--heal-calib-samples",
            "2",
            "--heal-calib-seq-len",
            "64",
        ],
        [
            {"pass": "prune-bi", "remove": 4},
            {"pass": "heal", "steps": 3, "calib-samples": 2, "calib-seq-len": 64},
        ],
    ),
    "rotate-sparsify": (
        ["rotate-sparsify", "--sparsity", "0.3"],
        [{"pass": "rotate-sparsify", "sparsity": 0.3}],
    ),
    "absorb": (["absorb", "--keep-ratio", "0.75"], [{"pass": "absorb", "keep-ratio": 0.75}]),
    "kv-compress": (
        [
            "kv-compress",
            "--budget",
            "0.5",
            "--train-steps",
            "2",
            "--train-samples",
            "4",
            "--train-seq-len",
            "64",
            "--search-samples",
            "4",
            "--search-seq-len",
            "64",
        ],
        [
            {
                "pass": "kv-compress",
                "budget": 0.5,
                "train-steps": 2,
                "train-samples": 4,
                "train-seq-len": 64,
                "search-samples": 4,
                "search-seq-len": 64,
            }
        ],
    ),
}


def _weights_digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def _history(folder) -> list[dict]:
    """The history's pass records without what differs between any two runs (times, library versions)."""
    passes = json.loads((folder / "llmsurgery_history.json").read_text())["passes"]
    return [
        {k: v for k, v in record.items() if k not in ("seconds", "finished_at", "versions")}
        for record in passes
    ]


def _run_both(tmp_path, model: str, command: list[str], passes: list[dict], command_extra=()):
    by_command, by_recipe = tmp_path / "command", tmp_path / "recipe"
    result = run_cli(
        command[0],
        model,
        *command[1:],
        *command_extra,
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "64",
        "--output",
        by_command,
    )
    assert result.exit_code == 0, result.output
    recipe = tmp_path / "recipe.yaml"
    entries = [entry | SMALL if i == 0 else entry for i, entry in enumerate(passes)]
    recipe.write_text(yaml.safe_dump({"version": 1, "model": model, "passes": entries}, sort_keys=False))
    result = run_cli("run", recipe, "--output", by_recipe)
    assert result.exit_code == 0, result.output
    return by_command, by_recipe


@pytest.mark.parametrize("case", list(CASES))
def test_command_and_recipe_write_the_same_model(case, tmp_path):
    command, passes = CASES[case]
    by_command, by_recipe = _run_both(tmp_path, "smollm2-135m", command, passes)
    digest = _weights_digest(by_command)
    assert digest and digest == _weights_digest(by_recipe)
    assert _history(by_command) == _history(by_recipe)
    assert [r["pass"] for r in _history(by_command)] == [p["pass"] for p in passes]  # one name per pass
    if case == "prune-heal":  # the teacher was the original, held in memory; the output is a stock checkpoint
        heal = _history(by_command)[1]["report"]
        assert heal["teacher"] == "the input model" and heal["removed_layers"] == sorted(
            _history(by_command)[0]["report"]["removed_layers"]
        )
        model, tok = stock_load(by_command), load_model(str(by_command)).tokenizer
        assert len(model.model.layers) == 26
        with torch.no_grad():
            assert (
                model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=4, do_sample=False).shape[1]
                > 4
            )
    if case == "prune":  # the recipe a command saves beside its model makes that model again
        again = tmp_path / "again"
        assert run_cli("run", by_command / "llmsurgery_recipe.yaml", "--output", again).exit_code == 0
        assert _weights_digest(again) == digest


def test_heal_command_and_recipe_write_the_same_model(tmp_path):
    pruned = tmp_path / "pruned"
    assert (
        run_cli(
            "prune",
            "--bi",
            "smollm2-135m",
            "--remove",
            "4",
            "--output",
            pruned,
            *[str(a) for kv in SMALL.items() for a in (f"--{kv[0]}", kv[1])],
        ).exit_code
        == 0
    )
    by_command, by_recipe = _run_both(
        tmp_path,
        str(pruned),
        ["heal", "--teacher", "smollm2-135m", "--steps", "3"],
        [{"pass": "heal", "teacher": "smollm2-135m", "steps": 3}],
    )
    assert _weights_digest(by_command) == _weights_digest(by_recipe)
    assert _history(by_command) == _history(by_recipe)
    assert _history(by_command)[-1]["report"]["teacher"] == "smollm2-135m"
