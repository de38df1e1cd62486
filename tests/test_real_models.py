"""End-to-end checks on the real small models that packages ship (converted once per cache)."""

import json
import random
import re
import statistics

import pytest
import torch
from helpers import logits_of, run_cli, stock_load

from llmsurgery.builtin_tasks import task_dir
from llmsurgery.corpora import evaluation_documents
from llmsurgery.model_io import load_model
from llmsurgery.passes.prune_bi.maths import remove_layers_

pytestmark = pytest.mark.real
PROMPT = "The prime minister said on Tuesday that the government"


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@torch.no_grad()
def token_ppl(model, tokenizer, docs, max_tokens=256):
    nll, count = 0.0, 0
    for doc in docs:
        ids = [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"][
            : max_tokens - 1
        ]
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return float(torch.exp(torch.tensor(nll / count)))


@torch.no_grad()
def test_eval_news_perplexity_matches_plain_transformers(smollm2, tmp_path):
    result = run_cli(
        "eval",
        "smollm2-135m",
        "--tasks",
        "news_ppl,news_cloze",
        "--limit",
        "20",
        "--json",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    assert "word_perplexity" in result.output and "acc" in result.output
    rows = {
        (r["task"], r["metric"]): r["value"] for r in json.loads((tmp_path / "r.json").read_text())["results"]
    }
    assert all(v == v and abs(v) != float("inf") for v in rows.values())
    assert 0.25 < rows[("news_cloze", "acc")] <= 1.0
    # The same windows by hand: each document after the prefix token, summed log-likelihood per word.
    docs = [
        json.loads(line)["text"] for line in (task_dir() / "news_eval.jsonl").read_text().splitlines()[:20]
    ]
    model, tok = smollm2.model, smollm2.tokenizer
    ll, words = 0.0, 0
    for doc in docs:
        ids = [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        ll -= torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        words += len(re.split(r"\s+", doc))
    plain = float(torch.exp(torch.tensor(-ll / words)))
    assert rows[("news_ppl", "word_perplexity")] == pytest.approx(plain, rel=0.01)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_convert_then_stock_reload_gives_same_logits(name, tmp_path):
    loaded = load_model(name)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    expected = logits_of(loaded.model, ids)
    del loaded
    result = run_cli("convert", name, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(logits_of(stock_load(tmp_path / "out"), ids), expected, rtol=0, atol=0)


def test_prune_smollm2_beats_naive_choices(smollm2, tmp_path):
    out = tmp_path / "smol23"
    result = run_cli("prune", "--bi", "smollm2-135m", "--remove", "7", "--output", out)
    assert result.exit_code == 0, result.output
    pruned = stock_load(out)
    assert pruned.config.num_hidden_layers == 23
    tok = smollm2.tokenizer
    text = tok.decode(
        pruned.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=10, do_sample=False)[0]
    )
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    docs = evaluation_documents("news")[:12]
    removed = json.loads((out / "llmsurgery_history.json").read_text())["passes"][0]["report"][
        "removed_layers"
    ]
    ppl_bi = token_ppl(pruned, tok, docs)

    def ppl_without(layers):
        import copy

        model = copy.deepcopy(smollm2.model)
        remove_layers_(model, layers)
        return token_ppl(model, tok, docs)

    rng = random.Random(0)
    random_median = statistics.median(ppl_without(sorted(rng.sample(range(30), 7))) for _ in range(3))
    assert ppl_bi < random_median and ppl_bi < ppl_without(list(range(23, 30)))
    assert ppl_bi == pytest.approx(ppl_without(removed), rel=1e-4)


def test_prune_gemma3_keeps_attention_pattern(tmp_path):
    out = tmp_path / "gemma14"
    result = run_cli("prune", "--bi", "gemma3-270m", "--remove", "4", "--output", out, "--calib-samples", "4")
    assert result.exit_code == 0, result.output
    removed = json.loads((out / "llmsurgery_history.json").read_text())["passes"][0]["report"][
        "removed_layers"
    ]
    original_types = json.loads((load_model("gemma3-270m").folder / "config.json").read_text())["layer_types"]
    model = stock_load(out)
    assert model.config.layer_types == [t for i, t in enumerate(original_types) if i not in removed]
    assert [layer.self_attn.is_sliding for layer in model.model.layers] == [
        t == "sliding_attention" for t in model.config.layer_types
    ]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(PROMPT, return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 8


def test_rotate_sparsify_smollm2_beats_magnitude(smollm2, tmp_path):
    import copy

    from llmsurgery.calibration import CalibConfig, calibration_batches
    from llmsurgery.passes import RotateSparsify
    from llmsurgery.passes.rotate_sparsify.maths import rotate_sparsify_
    from llmsurgery.perplexity import document_windows, token_perplexity

    windows = document_windows(smollm2.tokenizer, evaluation_documents("news")[:8], max_tokens=256)
    calib = CalibConfig(source="news", samples=8, seq_len=512)
    batches = calibration_batches(smollm2.tokenizer, calib)
    ppl = {}
    for s in (0.25, 0.5):
        for method in ("magnitude", "larosa"):
            model = copy.deepcopy(smollm2.model)
            rotate_sparsify_(
                model, batches, RotateSparsify(sparsity=s, method=method, split=(1.0, 0.0), calib=calib)
            )
            ppl[method, s] = token_perplexity(model, windows)
    dense = token_perplexity(smollm2.model, windows)
    assert dense < ppl["larosa", 0.25] < ppl["larosa", 0.5]
    assert ppl["larosa", 0.5] < 0.9 * ppl["magnitude", 0.5] and ppl["larosa", 0.25] < ppl["magnitude", 0.25]

    out = tmp_path / "sparse40"
    result = run_cli("rotate-sparsify", "smollm2-135m", "--sparsity", "0.4", "--output", out)
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tok = smollm2.tokenizer
    text = tok.decode(
        model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=12, do_sample=False)[0]
    )
    assert text.startswith(PROMPT) and len(text.split()) > len(PROMPT.split()) + 3

    # One-token decoding goes through the sparse kernel (issue 8) and gives the dense path's logits.
    from llmsurgery.modeling.modeling_llmsurgery import sparse_kernel_calls

    assert sparse_kernel_calls(model) > 0
    ids = tok(PROMPT, return_tensors="pt").input_ids
    step = {}
    for sparse in (False, True):
        model.config.sparse_decode = sparse
        cache = model(ids[:, :-1], use_cache=True).past_key_values
        step[sparse] = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step[True], step[False], rtol=0, atol=1e-4)


def test_absorb_smollm2_beats_vanilla_and_runs_everywhere(smollm2, tmp_path):
    import copy

    from llmsurgery.calibration import CalibConfig, calibration_batches
    from llmsurgery.passes import Absorb
    from llmsurgery.passes.absorb.maths import absorb_decompose_, v_input_covariances
    from llmsurgery.perplexity import document_windows, token_perplexity

    windows = document_windows(smollm2.tokenizer, evaluation_documents("news")[:8], max_tokens=256)
    calib = CalibConfig(source="news", samples=8, seq_len=512)
    covs = v_input_covariances(smollm2.model, calibration_batches(smollm2.tokenizer, calib))
    dense = token_perplexity(smollm2.model, windows)
    ppl = {}
    for keep in (0.875, 0.75):
        for criterion in ("whitened", "norm"):
            model = copy.deepcopy(smollm2.model)
            absorb_decompose_(model, Absorb(criterion=criterion, keep_ratio=keep, calib=calib), covs=covs)
            ppl[criterion, keep] = token_perplexity(model, windows)
    assert dense < ppl["whitened", 0.875] < ppl["whitened", 0.75]
    assert (
        ppl["whitened", 0.875] < 0.5 * ppl["norm", 0.875] and ppl["whitened", 0.75] < 0.5 * ppl["norm", 0.75]
    )

    out = tmp_path / "absorbed"
    result = run_cli(
        "absorb", "smollm2-135m", "--keep-ratio", "0.875", "--output", out, "--calib-samples", "8"
    )
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tok = smollm2.tokenizer
    text = tok.decode(
        model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=12, do_sample=False)[0]
    )
    assert text.startswith(PROMPT) and len(text.split()) > len(PROMPT.split()) + 3
    result = run_cli("eval", out, "--tasks", "news_ppl", "--limit", "5")
    assert result.exit_code == 0 and "word_perplexity" in result.output, result.output
    info = json.loads(run_cli("inspect", out, "--json").output)
    assert info["kv_cache_bytes_per_token"] == 30 * 4 * (
        3 * 64 + 3 * 56
    )  # K full, V at 56 of 64 dims per KV head


def test_kv_compress_smollm2_training_helps_and_cache_shrinks(smollm2, tmp_path):
    import copy

    from llmsurgery.calibration import CalibConfig, calibration_batches
    from llmsurgery.passes import KVCompress
    from llmsurgery.passes.kv_compress.maths import (
        MatryoshkaState,
        attach_,
        detach_,
        init_from_pca_,
        train_,
        uniform_ranks,
    )
    from llmsurgery.perplexity import document_windows, token_perplexity

    model, tok = copy.deepcopy(smollm2.model), smollm2.tokenizer
    windows = document_windows(tok, evaluation_documents("news")[:8], max_tokens=256)
    cfg = KVCompress(
        budget=0.5,
        train_steps=20,
        calib=CalibConfig(samples=8, seq_len=512),
        train_samples=40,
        train_seq_len=256,
    )
    state = MatryoshkaState(64, [[64] * 3 for _ in range(30)], 8)
    saved = attach_(model, state)
    init_from_pca_(model, state, calibration_batches(tok, cfg.calib), v_identity=False)

    def ppl_at_half() -> float:
        state.set_ranks(uniform_ranks(state, 0.5))
        state.project = True
        state.refresh_bases()
        return token_perplexity(model, windows)

    pca = ppl_at_half()
    losses = train_(model, state, calibration_batches(tok, cfg.train_calib), cfg)
    trained = ppl_at_half()
    detach_(saved)
    assert token_perplexity(smollm2.model, windows) < trained < 0.8 * pca, (trained, pca)
    assert sum(losses[-5:]) < sum(losses[:5])

    out = tmp_path / "kv"
    result = run_cli(
        "kv-compress",
        "smollm2-135m",
        "--budget",
        "0.5",
        "--output",
        out,
        "--train-steps",
        "2",
        "--calib-samples",
        "4",
        "--train-samples",
        "4",
        "--search-samples",
        "2",
        "--search-seq-len",
        "64",
    )
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM, DynamicCache

    compressed = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    cache = DynamicCache(config=compressed.config)
    text = tok.decode(
        compressed.generate(
            **tok(PROMPT, return_tensors="pt"), max_new_tokens=12, do_sample=False, cache=cache
        )[0]
    )
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    per_token = (
        sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4 / cache.get_seq_length()
    )
    assert per_token == json.loads(run_cli("inspect", out, "--json").output)["kv_cache_bytes_per_token"]
    report = json.loads((out / "llmsurgery_history.json").read_text())["passes"][-1]["report"]
    assert per_token == pytest.approx(report["budget_reached"] * 30 * 2 * 3 * 64 * 4, abs=1e-3)
    assert (
        0.5 - 8 / (30 * 2 * 3 * 64) <= report["budget_reached"] <= 0.5
    )  # the search spends the budget, to a rank step


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    """The README's Python API example, as written, on the real model."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    reports = namespace["reports"]
    assert len(reports[0].removed_layers) == 7 and 0 < reports[1].attention_reduction < 0.2
    history = json.loads((tmp_path / "smollm2-api" / "llmsurgery_history.json").read_text())
    assert [p["pass"] for p in history["passes"]] == ["prune-bi", "absorb"]
