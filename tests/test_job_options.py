"""The job options are defined once (`job.JobOptions`): the pass commands' options, a recipe's job keys and the
Python API's keyword arguments are derived from it, and this file checks that the three agree."""

from __future__ import annotations

import inspect

import pytest
import typer.main
from helpers import run_cli

import llmsurgery
from llmsurgery.cli import app
from llmsurgery.errors import UserError
from llmsurgery.job import EvalOptions, JobOptions
from llmsurgery.passes import PASSES
from llmsurgery.recipe import Recipe

COMMANDS = {name: ("prune" if name == "prune-bi" else name) for name in PASSES}


def _flags(field: str) -> set[str]:
    """The command-line spellings JobOptions gives a field (eval: --eval and --eval-limit)."""
    if field == "eval":
        return {f"--{EvalOptions.model_fields[n].json_schema_extra['flag']}" for n in ("tasks", "limit")}
    info = JobOptions.model_fields[field]
    return {f"--{info.alias or field.replace('_', '-')}"}


def _command_options(command: str) -> dict[str, object]:
    """--flag -> the click parameter of a command, as the CLI really builds it."""
    click_group = typer.main.get_command(app)
    params = click_group.commands[command].params
    return {opt: p for p in params for opt in p.opts if opt.startswith("--")}


def test_every_pass_command_takes_every_job_option_with_its_default():
    for name, config in PASSES.items():
        options = _command_options(COMMANDS[name])
        for field, info in JobOptions.model_fields.items():
            if field == "model":
                continue
            flags = _flags(field)
            if field == "fsdp" and not (config.may_train or name == "prune-bi"):
                assert not flags & options.keys(), (name, field)  # --fsdp only where a pass may train
                continue
            assert flags <= options.keys(), (name, field)
            if field not in ("eval", "output"):
                assert options[next(iter(flags))].default == info.default, (name, field)


def test_the_recipe_schema_holds_every_job_option_as_described_once():
    recipe = Recipe.model_json_schema(by_alias=True)["properties"]
    job = JobOptions.model_json_schema(by_alias=True)["properties"]
    for key, described in job.items():
        if key == "eval":  # the recipe's eval block is the job's evaluation plus its gates
            eval_schema = Recipe.model_json_schema(by_alias=True)["$defs"]["EvalBlock"]["properties"]
            options_schema = EvalOptions.model_json_schema(by_alias=True)["properties"]
            assert {k: v for k, v in eval_schema.items() if k != "gates"} == options_schema
            continue
        assert recipe[key] == described, key


def test_the_api_takes_exactly_the_job_options():
    params = inspect.signature(llmsurgery.run_passes).parameters
    keywords = {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(keywords) == set(JobOptions.model_fields) - {"model"}
    for name, param in keywords.items():
        assert param.default == JobOptions.model_fields[name].default, name


def test_the_three_ways_build_the_same_options(tiny_models, tmp_path):
    """A command, a recipe and the API given the same settings hand the runner equal JobOptions."""
    from llmsurgery.cli_options import job_options
    from llmsurgery.recipe import parse_recipe

    model, out = str(tiny_models["llama"]), tmp_path / "out"
    parsed = {
        "eval_tasks": "news_ppl,pydoc_ppl",
        "eval_limit": 3,
        "output": out,
        "force": True,
        "dtype": "bfloat16",
        "device": "cpu",
        "trust_remote_code": False,
        "stream": "off",
        "fsdp": False,
        "model": model,
    }
    from_cli = job_options(parsed)
    recipe = parse_recipe(
        {
            "version": 1,
            "model": model,
            "output": str(out),
            "force": True,
            "dtype": "bfloat16",
            "stream": False,  # YAML's reading of `stream: off`
            "passes": [{"pass": "prune-bi", "remove": 1}],
            "eval": {"tasks": ["news_ppl", "pydoc_ppl"], "limit": 3},
        }
    )
    fields = {name: getattr(recipe, name) for name in JobOptions.model_fields}
    from_recipe = JobOptions(**fields | {"eval": recipe.eval.model_dump(exclude={"gates"})})
    from_api = JobOptions(
        model=model,
        output=out,
        force=True,
        dtype="bfloat16",
        stream="off",
        eval={"tasks": "news_ppl,pydoc_ppl", "limit": 3},
    )
    assert from_cli == from_recipe == from_api


def test_a_bad_job_option_is_named_by_its_spelling(tiny_models, tmp_path):
    result = run_cli(
        "prune", "--bi", tiny_models["llama"], "--remove", "1", "--dtype", "int3", "-o", tmp_path / "o"
    )
    assert result.exit_code == 2 and "--dtype: unknown dtype 'int3'" in result.output
    with pytest.raises(UserError, match="device: unknown device 'tpu'"):
        llmsurgery.run_passes(str(tiny_models["llama"]), [], device="tpu")
