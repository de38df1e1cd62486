import math

from helpers import run_cli

from llmsurgery.evaluate import Metric, compare, evaluate_model
from llmsurgery.model_io import load_model


def test_tiny_model_scores_through_lm_eval(tiny_models):
    metrics = evaluate_model(
        load_model(str(tiny_models["qwen3"])), ["news_ppl", "news_cloze"], limit=3, batch_size=4
    )
    by_name = {(m.task, m.name): m.value for m in metrics}
    assert set(by_name) >= {
        ("news_ppl", "word_perplexity"),
        ("news_ppl", "bits_per_byte"),
        ("news_cloze", "acc"),
    }
    assert all(math.isfinite(v) for v in by_name.values())
    assert by_name[("news_ppl", "word_perplexity")] > 1


def test_compare_rows():
    rows = compare([Metric("t", "ppl", 30.0, False)], [Metric("t", "ppl", 20.0, False)])
    assert rows[0]["diff"] == 10.0 and rows[0]["ratio"] == 1.5


def test_eval_cli_with_baseline(tiny_models, tmp_path):
    import json

    result = run_cli(
        "eval",
        tiny_models["llama"],
        "--baseline",
        tiny_models["mistral"],
        "--tasks",
        "pydoc_ppl",
        "--limit",
        "2",
        "--json",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert {"baseline", "diff", "ratio"} <= set(rows[0]) and "(baseline)" in result.output


def test_inspect_json(tiny_models):
    import json

    result = run_cli("inspect", tiny_models["gemma3_text"], "--json")
    info = json.loads(result.output)
    assert info["layers"] == 6 and info["kv_heads"] == 2 and info["head_dim"] == 16
    assert info["kv_cache_bytes_per_token"] == 2 * 6 * 2 * 16 * 4
    assert info["layer_types"] == {"full_attention": 2, "sliding_attention": 4}
