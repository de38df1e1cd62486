import json

import pytest
import torch
import torch.nn.functional as F
from helpers import PROMPT, run_cli, stock_load

from llmsurgery.corpora import evaluation_documents
from llmsurgery.model_io import load_model
from llmsurgery.passes.heal.maths import gap_neighbours, removed_from_history
from llmsurgery.passes.prune_bi.maths import remove_layers_
from llmsurgery.perplexity import document_windows

CALIB = ("--calib", "pydoc", "--calib-samples", "3", "--calib-seq-len", "48")
HEAL = ("--calib", "pydoc", "--calib-samples", "12", "--calib-seq-len", "48", "--steps", "12", "--lr", "3e-3")


@torch.no_grad()
def held_out_kl(student_folder, teacher_folder) -> float:
    """KL(teacher || student) per token on the evaluation part of the built-in news corpus (never calibration text)."""
    student, teacher = load_model(str(student_folder)), load_model(str(teacher_folder))
    windows = document_windows(teacher.tokenizer, evaluation_documents("news")[:4], max_tokens=64)
    total = count = 0
    for ids in windows:
        t = teacher.model(input_ids=ids).logits.log_softmax(-1)
        s = student.model(input_ids=ids).logits.log_softmax(-1)
        total += float(F.kl_div(s[0], t[0], log_target=True, reduction="sum"))
        count += ids.shape[1]
    return total / count


def _pruned(tiny_model, tmp_path, remove="2"):
    out = tmp_path / "pruned"
    assert run_cli("prune", tiny_model, "--bi", "--remove", remove, "--output", out, *CALIB).exit_code == 0
    return out


def test_gap_neighbours_and_removed_from_history():
    assert gap_neighbours([2, 3], 6) == [1, 2]  # teacher layers 1 and 4 -> student 1 and 2
    assert gap_neighbours([0], 4) == [0]
    assert gap_neighbours([5], 6) == [4]
    old_record = {"pass": "block_influence", "report": {"removed_layers": [1], "layers_before": 6}}
    history = {
        "passes": [
            old_record,
            {"pass": "absorb", "report": {}},
            {"pass": "prune-bi", "report": {"removed_layers": [1, 3], "layers_before": 5}},
        ]
    }
    assert removed_from_history(history) == ([1, 2, 4], 6)  # second prune's 1 and 3 are the original 2 and 4
    assert removed_from_history({"passes": []}) is None


def test_heal_lowers_held_out_kl_on_every_architecture(tiny_model, tmp_path):
    pruned = _pruned(tiny_model, tmp_path)
    healed = tmp_path / "healed"
    result = run_cli(
        "heal", pruned, "--teacher", tiny_model, "--output", healed, *HEAL, "--json", tmp_path / "heal.json"
    )
    assert result.exit_code == 0, result.output
    before, after = held_out_kl(pruned, tiny_model), held_out_kl(healed, tiny_model)
    assert after < before, (before, after)
    report = json.loads((tmp_path / "heal.json").read_text())
    history = json.loads((healed / "llmsurgery_history.json").read_text())
    prune_report = history["passes"][0]["report"]
    entry = history["passes"][-1]
    assert entry["pass"] == "heal" and entry["report"]["removed_layers"] == sorted(
        prune_report["removed_layers"]
    )
    assert entry["report"]["steps"] == 12 and entry["report"]["tokens"] == 12 * 2 * 48
    assert len(entry["report"]["loss_curve"]) == 12 and report["trained_parameter_count"] == sum(
        report["trained_parameters"].values()
    )
    assert any(".mlp." in name for name in report["trained_parameters"]) and any(
        "norm" in name for name in report["trained_parameters"]
    )
    assert report["held_out_kl_after"] < report["held_out_kl_before"] and report["kept"]
    model = stock_load(healed)  # a standard checkpoint: no remote code
    assert not (healed / "modeling_llmsurgery.py").exists()
    with torch.no_grad():
        out = model.generate(PROMPT[:, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


def test_only_the_chosen_tensors_change(tiny_models, tmp_path):
    pruned = _pruned(tiny_models["llama"], tmp_path)
    healed = tmp_path / "healed"
    assert (
        run_cli("heal", pruned, "--output", healed, *HEAL, "--train", "mlp-near-gaps").exit_code == 0
    )  # teacher from the history
    a, b = load_model(str(pruned)).model.state_dict(), load_model(str(healed)).model.state_dict()
    near = gap_neighbours(
        json.loads((healed / "llmsurgery_history.json").read_text())["passes"][-1]["report"][
            "removed_layers"
        ],
        6,
    )
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed == {k for k in a if ".mlp." in k and int(k.split(".")[2]) in near}


def test_prune_heal_in_one_go_equals_prune_then_heal(tiny_models, tmp_path):
    tiny = tiny_models["qwen2"]
    both = tmp_path / "both"
    result = run_cli(
        "prune",
        tiny,
        "--bi",
        "--remove",
        "2",
        "--output",
        both,
        *CALIB,
        "--heal",
        "--heal-steps",
        "12",
        "--heal-lr",
        "3e-3",
    )
    assert result.exit_code == 0, result.output
    # the same by hand: the teacher (shared with the pruned model in memory) must have stayed the original
    pruned = _pruned(tiny, tmp_path)
    healed = tmp_path / "healed"
    assert (
        run_cli(
            "heal",
            pruned,
            "--teacher",
            tiny,
            "--output",
            healed,
            "--calib",
            "pydoc",
            "--steps",
            "12",
            "--lr",
            "3e-3",
        ).exit_code
        == 0
    )
    a, b = load_model(str(both)).model.state_dict(), load_model(str(healed)).model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    passes = [p["pass"] for p in json.loads((both / "llmsurgery_history.json").read_text())["passes"]]
    assert passes == ["prune-bi", "heal"]


def test_removed_layers_found_by_weights_and_unpruned_model_healed_all_the_same(tiny_models, tmp_path):
    tiny = tiny_models["mistral"]
    loaded = load_model(str(tiny))
    remove_layers_(loaded.model, [1, 4])
    loaded.model.save_pretrained(tmp_path / "foreign")  # pruned elsewhere: no llmsurgery history
    loaded.tokenizer.save_pretrained(tmp_path / "foreign")
    result = run_cli(
        "heal",
        tmp_path / "foreign",
        "--teacher",
        tiny,
        "--output",
        tmp_path / "h1",
        *HEAL,
        "--json",
        tmp_path / "h1.json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "h1.json").read_text())["removed_layers"] == [1, 4]
    # nothing removed: a perturbed copy heals towards the teacher, training all MLPs and norms
    noisy = load_model(str(tiny))
    with torch.no_grad():
        for name, p in noisy.model.named_parameters():
            if ".mlp." in name:
                p.add_(0.05 * torch.randn_like(p))
    noisy.model.save_pretrained(tmp_path / "noisy")
    noisy.tokenizer.save_pretrained(tmp_path / "noisy")
    result = run_cli(
        "heal",
        tmp_path / "noisy",
        "--teacher",
        tiny,
        "--output",
        tmp_path / "h2",
        *HEAL,
        "--json",
        tmp_path / "h2.json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "h2.json").read_text())
    assert (
        report["removed_layers"] == []
        and len([m for m in report["trained_modules"] if m.endswith(".mlp")]) == 6
    )
    assert held_out_kl(tmp_path / "h2", tiny) < held_out_kl(tmp_path / "noisy", tiny)


def test_a_harmful_heal_keeps_the_old_weights(tiny_models, tmp_path):
    pruned = _pruned(tiny_models["llama"], tmp_path)
    result = run_cli(
        "heal",
        pruned,
        "--output",
        tmp_path / "h",
        "--calib",
        "pydoc",
        "--calib-samples",
        "6",
        "--calib-seq-len",
        "48",
        "--steps",
        "6",
        "--lr",
        "30",
        "--json",
        tmp_path / "h.json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "h.json").read_text())
    assert not report["kept"] and not report["held_out_kl_after"] <= report["held_out_kl_before"]
    a, b = load_model(str(pruned)).model.state_dict(), load_model(str(tmp_path / "h")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--train", "mlps"), "train takes"),
        (("--removed", "0,x"), "--removed: takes 0-based"),
        (("--removed", "0"), "does not match"),
        (("--steps", "0"), "--steps"),
    ],
)
def test_bad_heal_options_fail_in_one_line(tiny_models, tmp_path, args, message):
    pruned = _pruned(tiny_models["llama"], tmp_path)
    result = run_cli("heal", pruned, "--output", tmp_path / "h", *HEAL, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "h").exists()


def test_heal_needs_a_teacher_it_can_use(tiny_models, tmp_path):
    result = run_cli(
        "heal", tiny_models["llama"], "--output", tmp_path / "h", *HEAL
    )  # no history names a source
    assert result.exit_code == 2 and "give --teacher" in result.output
    result = run_cli(
        "heal",
        tiny_models["llama"],
        "--teacher",
        tiny_models["gemma3_text"],
        "--output",
        tmp_path / "h",
        *HEAL,
    )
    assert result.exit_code == 2 and "teacher" in result.output
    assert not (tmp_path / "h").exists()


def test_heal_in_a_recipe_distils_towards_the_input_model(tiny_models, tmp_path):
    import yaml

    recipe = {
        "version": 1,
        "model": str(tiny_models["llama"]),
        "calibration": {"source": "pydoc", "seed": 0},
        "passes": [
            {"pass": "prune-bi", "remove": 2, "calib-samples": 3, "calib-seq-len": 48},
            {"pass": "heal", "steps": 6, "lr": 3e-3, "calib-samples": 12, "calib-seq-len": 48},
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", path, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    passes = json.loads((tmp_path / "out" / "llmsurgery_history.json").read_text())["passes"]
    assert [p["pass"] for p in passes] == ["prune-bi", "heal"]
    assert passes[1]["report"]["removed_layers"] == sorted(passes[0]["report"]["removed_layers"])
    assert passes[1]["report"]["teacher"] == "the input model" and passes[1]["input_passes"] == 1
    recipe["passes"][0] = {"pass": "absorb", "keep-ratio": 0.75}
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", path, "--output", tmp_path / "bad")
    assert result.exit_code == 2 and "only prune-bi may come before it" in result.output
    assert not (tmp_path / "bad").exists()
