import json
from pathlib import Path

import pytest
import yaml
from helpers import run_cli
from safetensors.torch import load_file

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
TINY_CALIB = {"source": "pydoc", "samples": 3, "seq-len": 48, "seed": 0}


def _write(tmp_path, data: dict, name="r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _tiny_recipe(model, **extra) -> dict:
    return {
        "version": 1,
        "model": str(model),
        "calibration": TINY_CALIB,
        "passes": [{"pass": "prune-bi", "remove": 2}, {"pass": "absorb", "keep-ratio": 0.75}],
        **extra,
    }


def test_recipes_exist_for_every_pass_and_a_pipeline():
    from llmsurgery.passes import PASSES

    named = {p["pass"] for r in RECIPES for p in yaml.safe_load(r.read_text())["passes"]}
    assert named == set(PASSES)
    assert any(len(yaml.safe_load(r.read_text())["passes"]) > 1 for r in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(recipe):
    result = run_cli("recipe", "validate", recipe)
    assert result.exit_code == 0 and "valid" in result.output, result.output


def test_schema_is_json_with_the_pass_options():
    result = run_cli("recipe", "schema")
    schema = json.loads(result.output)
    assert "keep-ratio" in json.dumps(schema) and "passes" in schema["properties"]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda r: r["passes"][1].update({"keep-ratoi": 0.5}),
            "passes[1].keep-ratoi: Extra inputs are not permitted",
        ),
        (lambda r: r["passes"][0].update({"ratio": -0.2, "remove": None}), "passes[0].ratio"),
        (lambda r: r["passes"][1].update({"keep-ratio": 1.5}), "passes[1].keep-ratio"),
        (lambda r: r.update({"model": "/nonexistent/model"}), "/nonexistent/model"),
        (lambda r: r.pop("version"), "version: Field required"),
        (
            lambda r: r["passes"].append({"pass": "prune-bi"}),
            "passes[2]: give exactly one of remove and ratio",
        ),
        (
            lambda r: r.update({"eval": {"tasks": ["news_ppl"], "gates": {"news_cloze.acc": {"min": 0.5}}}}),
            "not in eval.tasks",
        ),
        (lambda r: r.update({"eval": {"tasks": ["no_such_task"]}}), "no_such_task"),
    ],
)
def test_bad_recipes_fail_with_a_located_message_and_write_nothing(tiny_models, tmp_path, change, message):
    data = _tiny_recipe(tiny_models["llama"], output=str(tmp_path / "out"))
    change(data)
    path = _write(tmp_path, data)
    for args in (("recipe", "validate", path), ("run", path)):
        result = run_cli(*args)
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_set_overrides_and_bad_set_paths(tiny_models, tmp_path):
    path = _write(tmp_path, _tiny_recipe(tiny_models["llama"]))
    ok = run_cli(
        "recipe",
        "validate",
        path,
        "--set",
        "passes[1].keep-ratio=0.5",
        "--set",
        "calibration.samples=2",
        "-o",
        tmp_path / "o",
    )
    assert ok.exit_code == 0, ok.output
    bad = run_cli("recipe", "validate", path, "--set", "passes[7].rank=2")
    assert bad.exit_code == 2 and "no such place" in bad.output
    typo = run_cli("recipe", "validate", path, "--set", "passes[1].rnak=2")
    assert typo.exit_code == 2 and "passes[1].rnak" in typo.output
    gated = _write(
        tmp_path,
        _tiny_recipe(
            tiny_models["llama"],
            eval={"tasks": ["pydoc_ppl"], "gates": {"pydoc_ppl.word_perplexity": {"max": 5}}},
        ),
    )
    dotted = run_cli(
        "recipe",
        "validate",
        gated,
        "-o",
        tmp_path / "o",
        "--set",
        "eval.gates.pydoc_ppl.word_perplexity.max=-1",
        "--set",
        "eval.gates.pydoc_ppl.word_perplexity.mx=1",
    )
    assert dotted.exit_code == 2 and "eval.gates.pydoc_ppl.word_perplexity.mx" in dotted.output, dotted.output


def test_failing_gate_exits_1_and_says_which_and_by_how_much(tiny_models, tmp_path):
    data = _tiny_recipe(
        tiny_models["llama"],
        eval={
            "tasks": ["pydoc_ppl"],
            "limit": 2,
            "gates": {
                "pydoc_ppl.word_perplexity": {"max": 1.0},
                "pydoc_ppl.byte_perplexity": {"max_ratio": 1000},
            },
        },
    )
    result = run_cli("run", _write(tmp_path, data), "--output", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert (
        "pydoc_ppl.word_perplexity" in result.output
        and "off by" in result.output
        and "vs max 1" in result.output
    )
    assert "byte_perplexity {'max_ratio': 1000.0}: passed" in result.output


def test_saved_recipe_reproduces_the_output_bit_for_bit(tiny_models, tmp_path):
    first = tmp_path / "first"
    assert (
        run_cli("run", _write(tmp_path, _tiny_recipe(tiny_models["qwen2"])), "--output", first).exit_code == 0
    )
    saved = first / "llmsurgery_recipe.yaml"
    assert yaml.safe_load(saved.read_text())["passes"][1]["keep-ratio"] == 0.75
    history = json.loads((first / "llmsurgery_history.json").read_text())
    assert [p["pass"] for p in history["passes"]] == ["prune-bi", "absorb"]
    second = tmp_path / "second"
    result = run_cli("run", saved, "--output", second)
    assert result.exit_code == 0, result.output
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


SMALL = {  # every shipped recipe, shrunk to CI size with --set (the recipes themselves keep their real sizes)
    "prune-bi": ["eval.limit=3"],
    "rotate-sparsify": ["eval.limit=3", "calibration.samples=8"],
    "absorb": ["eval.limit=3", "calibration.samples=4"],
    "kv-compress": [
        "eval.limit=3",
        "calibration.samples=4",
        "passes[0].train-steps=2",
        "passes[0].train-samples=4",
        "passes[0].uniform=true",
    ],
    "pipeline": ["eval.limit=3", "calibration.samples=4"],
    "prune-heal": ["eval.limit=3", "calibration.samples=4", "passes[1].steps=3", "passes[1].calib-samples=8"],
}


@pytest.mark.real
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_runs_on_the_real_model(recipe, tmp_path):
    """End to end at CI size. Three documents decide nothing about quality (a cloze gate moves in steps of 1/3),
    so a gate may pass or fail here; what must hold is that every gate was evaluated against a real baseline."""
    sets = [arg for item in SMALL[recipe.stem] for arg in ("--set", item)]
    result = run_cli("run", recipe, "--output", tmp_path / "out", *sets, "--json", tmp_path / "r.json")
    results = json.loads((tmp_path / "r.json").read_text())
    assert result.exit_code == (1 if results["failed_gates"] else 0), result.output
    gates = yaml.safe_load(recipe.read_text())["eval"]["gates"]
    assert set(results["gates"]) == set(gates) and all(
        f.split(":")[0] in gates for f in results["failed_gates"]
    )
    assert all("baseline" in row and row["value"] == row["value"] for row in results["eval"])
    saved = yaml.safe_load((tmp_path / "out" / "llmsurgery_recipe.yaml").read_text())
    assert [p["pass"] for p in saved["passes"]] == [
        p["pass"] for p in yaml.safe_load(recipe.read_text())["passes"]
    ]


def test_recipe_schema_documents_every_pass_option_with_its_bounds():
    """`recipe schema` is derived from the pass configs: every option has a description, every number its range."""
    from llmsurgery.passes import PASSES

    result = run_cli("recipe", "schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    defs = schema["$defs"]
    for name, config in PASSES.items():
        props = defs[config.__name__]["properties"]
        assert set(props) == {info.alias or field for field, info in config.model_fields.items()}, name
        for option, prop in props.items():
            if option == "pass":
                assert prop.get("const") == name or prop.get("enum") == [name]
                continue
            assert prop.get("description"), f"{name}.{option} has no description"
            numbers = [
                p
                for p in [prop, *prop.get("anyOf", []), *prop.get("prefixItems", []), prop.get("items") or {}]
                if p.get("type") in ("integer", "number")
            ]
            for p in numbers:
                assert ("minimum" in p or "exclusiveMinimum" in p) and (
                    "maximum" in p or "exclusiveMaximum" in p
                ), f"{name}.{option} has no bounds: {prop}"
    # and the command line reads the same fields: a default changed in the config shows in --help
    assert "[default: 40]" in run_cli("rotate-sparsify", "--help").output.replace("\n", " ").replace("│", "")


@pytest.mark.parametrize("word, means", [("on", "on"), ("off", "off"), ("yes", "on"), ("true", "on")])
def test_yaml_booleans_mean_the_word_the_user_wrote(word, means):
    """YAML 1.1 reads `stream: on` as a boolean; the recipe takes it as the word."""
    from llmsurgery.recipe import load_yaml, parse_recipe

    data = load_yaml(
        f"version: 1\nmodel: m\nstream: {word}\npasses:\n  - pass: prune-bi\n    remove: 1\n", "r"
    )
    assert data["stream"] in (True, False)  # what YAML made of it
    assert parse_recipe(data).stream == means


def test_a_streamed_command_saves_a_recipe_that_streams(tiny_models, tmp_path):
    out = tmp_path / "out"
    args = ["--remove", "2", "--calib", "pydoc", "--calib-samples", "2", "--calib-seq-len", "32"]
    assert (
        run_cli("prune", "--bi", tiny_models["llama"], *args, "--stream", "on", "--output", out).exit_code
        == 0
    )
    saved = yaml.safe_load((out / "llmsurgery_recipe.yaml").read_text())
    assert saved["stream"] in ("on", True)
    again = tmp_path / "again"
    result = run_cli("run", out / "llmsurgery_recipe.yaml", "--output", again)
    assert result.exit_code == 0, result.output
    assert load_file(again / "model.safetensors").keys() == load_file(out / "model.safetensors").keys()
