"""benchmarks/kv_recall.py: the synthetic recall tasks, the scores, bad input, and (kvpress extra) a tiny run."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from kv_recall_tasks import (  # noqa: E402
    ADJECTIVES,
    NEEDLE,
    NOUNS,
    TASKS,
    Haystacks,
    bootstrap_ci,
    make_sample,
    sentences,
    string_match_all,
)

KEYS = [(a, n) for a in ADJECTIVES[:8] for n in NOUNS[:8]]


@pytest.fixture(scope="module")
def hay(tiny_models):
    from transformers import AutoTokenizer

    from llmsurgery.corpora import evaluation_documents

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    return Haystacks(tok, {"news": evaluation_documents("news"), "pydoc": evaluation_documents("pydoc")})


def _find(haystack: list[int], needle: list[int]) -> list[int]:
    return [i for i in range(len(haystack) - len(needle) + 1) if haystack[i : i + len(needle)] == needle]


@pytest.mark.parametrize("task", TASKS)
def test_every_sample_has_the_exact_length_and_holds_its_needles(hay, task):
    for index in range(6):
        s = make_sample(task, 768, index, hay, seed=0)
        assert len(s.context) == 768 and s.context[0] == hay.tok.bos_token_id
        text = hay.tok.decode(s.context)
        assert all(text.count(v) == 1 for v in s.values)  # each expected value once, in the context only
        assert hay.tok.decode(s.answer).strip() == ", ".join(s.values)
        assert "special magic number" in hay.tok.decode(s.question)
        needles = text.count("One of the special magic numbers for")
        assert needles == {"multikey": 4, "multivalue": 4}.get(task, 1) or task == "needles"
        if task == "needles":  # nothing but needles, after less than one needle's worth of filler
            body = text.split("afterwards.\n", 1)[1]
            rest = re.sub(r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}\.", "", body)
            rest = " " + re.sub(r"\s+", " ", rest).strip()
            longest = max(len(hay.ids(" " + NEEDLE.format(key=f"{a}-{n}", value="1234567"))) for a, n in KEYS)
            assert needles >= 5 and len(hay.ids(rest)) < longest, rest
    again = make_sample(task, 768, 3, hay, seed=0)
    assert again.context == make_sample(task, 768, 3, hay, seed=0).context  # deterministic
    assert again.context != make_sample(task, 768, 3, hay, seed=1).context


def test_depths_cycle_over_eleven_and_place_the_needle_there(hay):
    positions = []
    for index in range(11):
        s = make_sample("news", 1024, index, hay, seed=0)
        key = hay.tok.decode(s.question).split(" for ")[1].split(" mentioned")[0]
        needle = hay.ids(" " + NEEDLE.format(key=key, value=s.values[0]))
        (at,) = _find(s.context, needle)
        positions.append(at / len(s.context))
        assert s.depth == index / 10
    assert positions == sorted(positions) and positions[0] < 0.15 and positions[-1] > 0.85


def test_haystacks_never_hold_calibration_text():
    from llmsurgery.corpora import calibration_documents, evaluation_documents

    for corpus in ("news", "pydoc"):
        calib = "\n".join(calibration_documents(corpus))
        held = [s for s in sentences(evaluation_documents(corpus)) if len(s) > 60]
        assert held and not [s for s in held if s in calib], corpus


def test_string_match_all_and_bootstrap():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert string_match_all("nothing", ["1"]) == 0.0
    lo, hi = bootstrap_ci([0.0] * 50 + [100.0] * 50)
    assert 35 < lo < 50 < hi < 65
    assert bootstrap_ci([100.0] * 20) == (100.0, 100.0)


def _bench(*args, block_kvpress=False, script="kv_recall.py"):
    code = (
        "import runpy, sys; "
        + ("sys.modules['kvpress'] = None; " if block_kvpress else "")
        + f"sys.argv = [{script!r}, *{list(map(str, args))!r}]; "
        + f"runpy.run_path({str(BENCH / script)!r}, run_name='__main__')"
    )
    # a guard against a hang only: the tiny run's first call takes 3 minutes alone, over 10 beside other work
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--haystack", "/nonexistent/notes.txt"), "--haystack: no such file /nonexistent/notes.txt"),
        (("--haystack", "news"), "--haystack: no such file news"),
        (("--budgets", "0.5,1.5"), "--budgets must lie strictly between 0 and 1"),
        (("--calib", "news+nope"), "--calib: calibration source 'news+nope'"),
        (("--train-steps", "0"), "--train-steps: Input should be greater than or equal to 1"),
        (("--positions", "300"), "--positions 300 is shorter than the 512-token calibration windows"),
        (
            ("--recent", "300"),
            "--recent takes 0 or a number of tokens up to a quarter of the shortest context (96)",
        ),
        (
            ("--recent", "64", "--budgets", "0.05"),
            "--recent 64: its exact keys alone would fill the smallest",
        ),
        (("--tasks", "filler,nope"), "--tasks: choose from"),
        (("--lengths", "64"), "at least 128 tokens"),
        (("--plot", "x.jpg"), "--plot takes a .png"),
        (("--projections", "pca@0.6"), "--projections: choose from pca@0.75,"),
        (("--resume", "/nonexistent/r.json"), "--resume: no such file"),
        (("--resume", f"{__file__},/nonexistent/r.json"), "--resume: no such file /nonexistent/r.json"),
        (("--resume", __file__, "--json", __file__), f"--json {__file__} is also a --resume file"),
        ((), "kvpress presses need the kvpress extra: pip install -e .[kvpress]"),
    ],
)
def test_bad_input_is_one_error_line(args, message):
    result = _bench(*args, block_kvpress=True)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


@pytest.mark.kvpress
def test_a_tiny_run_prints_every_table_and_one_line_per_budget(tiny_models, tmp_path):
    haystack = tmp_path / "mine.txt"
    paragraphs = [f"Paragraph {i}. The river ran past the mill for the {i}th time." for i in range(80)]
    haystack.write_text("\n\n".join(paragraphs))
    result = _bench(
        "--models", tiny_models["llama"], "--lengths", "512", "--samples", "2", "--budgets", "0.75,0.5",
        "--train-steps", "2", "--train-samples", "8", "--calib", "pydoc", "--haystack", haystack, "--all-cells",
        "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training projections" in result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-3].startswith("b=0.75: llmsurgery ") and " kvpress " in lines[-3]
    assert lines[-2].startswith("b=0.5: llmsurgery ") and lines[-1].startswith("b=0.75 keys only:")
    assert (
        "continuation perplexity" in " ".join(result.stdout.split())
        and (tmp_path / "r.png").stat().st_size > 10_000
    )
    (model,) = json.loads((tmp_path / "r.json").read_text())
    assert model["tasks"] == [
        "filler",
        "news",
        "multikey",
        "needles",
        "multivalue",
    ]  # the file replaced news/pydoc
    labels = {(m["label"], m["budget"]) for m in model["methods"]}
    assert not any("bw" in c for m in model["methods"] for c in m["cells"].values())  # no sliding layers
    for press in (
        "snapkv",
        "streamingllm",
        "tova",
        "expected_attention",
        "knorm",
        "think",
        "kv pca",
        "kv pairs",
        "kv trained",
    ):
        assert (press, 0.5) in labels and (press, 0.75) in labels
    assert ("kv trained keys only", 0.75) in labels and ("snapkv+think c=0.25", 0.5) in labels
    assert any(label.startswith("kv trained p=0.75 + ") and b == 0.5 for label, b in labels)
    assert (f"kv pairs keys only p=0.75 + {model['best_press']['0.5']}", 0.5) in labels
    # the same projections as presses on the stock model, alone and composed
    for kind in ("pca", "pairs", "trained"):
        assert {(f"kv {kind} press", 0.5), (f"kv {kind} keys only press", 0.75)} <= labels
        assert (f"kv {kind} keys only press p=0.75 + {model['best_press']['0.5']}", 0.5) in labels
    assert model["fallback"] and len(model["usable"]) == 5  # a random tiny model: dense scores 0 everywhere
    runtimes = {m["label"]: m.get("runtime") for m in model["methods"] if m["label"].startswith("kv ")}
    assert runtimes["kv pca keys only"] == runtimes["kv pairs keys only"] == "project_context_only"
    # where values are projected, the models keep exact ones (--exact-values) and so score as their presses
    assert runtimes["kv trained"] == runtimes["kv pca"] == "project_context_only, exact values"
    assert runtimes["kv trained press"] is None  # a press runs on the stock model
    for label in ("kv pca", "kv trained"):
        model_row, press_row = _row(model, label, 0.5), _row(model, f"{label} press", 0.5)
        for key, cell in model_row["cells"].items():
            assert cell["ll"] == pytest.approx(press_row["cells"][key]["ll"], abs=1e-3)
    for m in model["methods"]:
        assert set(m["cells"]) == {f"{t}@512" for t in model["tasks"]}
        for cell in m["cells"].values():
            assert len(cell["match"]) == len(cell["ll"]) == 2 and all(
                x in (0.0, 100.0) for x in cell["match"]
            )
            if m["label"] in ("snapkv", "kv pca", "kv trained"):  # the budget measured on the live cache
                assert all(b == pytest.approx(m["budget"], abs=0.01) for b in cell["b"])
            if m["label"] in (
                "kv pca press",
                "kv trained press",
            ):  # its ranks' coordinates, on the kept tokens
                reached = model["reached"][f"{m['label'].split()[1]}@{m['budget']:g}"]
                assert all(b == pytest.approx(reached, abs=1e-4) for b in cell["b"])
    again = _bench("--report", tmp_path / "r.json", block_kvpress=True)  # no kvpress needed to print it again
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-3:] == lines[-3:]
    # --resume with fewer samples and some of the projections: what the first run finished carries over, of the
    # projections not picked too (rows composed with the best press at a budget run again if fewer samples elect
    # another press)
    common = ["--models", tiny_models["llama"], "--lengths", "512", "--budgets", "0.75,0.5", "--train-steps", "2",
              "--train-samples", "8", "--calib", "pydoc", "--haystack", haystack, "--all-cells"]  # fmt: skip
    resumed = _bench(*common, "--samples", "1", "--projections", "pca@0.5,trained@keys",
                     "--resume", tmp_path / "r.json", "--json", tmp_path / "r1.json")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (first,) = json.loads((tmp_path / "r1.json").read_text())
    assert "carry over" in resumed.stdout and "kv-compress pca@0.5" not in first["seconds"]  # not run again
    assert first["ranks"]["pca@0.5"] == model["ranks"]["pca@0.5"]
    kept = {(m["label"], m["budget"]): m for m in first["methods"]}
    assert ("kv pca press", 0.5) in kept and ("kv trained press", 0.5) in kept  # all finished: carried
    # a run cut short before pca@0.5: its rows run, the carried trained bases' rows need no training
    (cut,) = json.loads((tmp_path / "r.json").read_text())
    cut["methods"] = [m for m in cut["methods"] if "kv pca" not in m["label"] or "keys only" in m["label"]]
    cut["ranks"].pop("pca@0.5")
    (tmp_path / "cut.json").write_text(json.dumps([cut]))
    (tmp_path / "none.json").write_text("[]")  # of several files, the first result that fits
    rest = _bench(*common, "--samples", "1", "--projections", "pca@0.5", "--resume",
                  f"{tmp_path / 'none.json'},{tmp_path / 'cut.json'}", "--json", tmp_path / "r2.json")  # fmt: skip
    assert rest.returncode == 0, rest.stderr[-3000:]
    (second,) = json.loads((tmp_path / "r2.json").read_text())
    assert (
        "kv-compress pca@0.5" in second["seconds"] and "Training projections" not in rest.stdout + rest.stderr
    )
    assert second["train"] == model["train"] and second["ranks"]["pca@0.5"] == model["ranks"]["pca@0.5"]
    labels = [(m["label"], m["budget"]) for m in second["methods"]]
    assert labels.index(("kv pca", 0.5)) < labels.index(("kv trained", 0.5))  # picked ones first
    assert {("kv trained press", 0.5), ("kv pca press", 0.5)} <= set(labels)
    # several files: each row from the first that finished it (here pca@0.5's from r.json: nothing left to run)
    both = _bench(*common, "--samples", "1", "--projections", "pca@0.5", "--resume",
                  f"{tmp_path / 'cut.json'},{tmp_path / 'r.json'}", "--json", tmp_path / "r3.json")  # fmt: skip
    assert both.returncode == 0, both.stderr[-3000:]
    (third,) = json.loads((tmp_path / "r3.json").read_text())
    assert "projections (PCA, training, rank search)" not in third["seconds"]
    assert third["ranks"]["pca@0.5"] == model["ranks"]["pca@0.5"]
    assert _row(third, "kv pca", 0.5)["cells"] == _row(first, "kv pca", 0.5)["cells"]
    assert (
        kept["kv pca", 0.5]["cells"]["filler@512"]["match"]
        == (next(m for m in model["methods"] if (m["label"], m["budget"]) == ("kv pca", 0.5)))["cells"][
            "filler@512"
        ]["match"][:1]
    )
    # a run of fewer samples (r1.json: 1) lends its rows to go on from, on the same bases (a sentinel marks what a
    # row kept), the dense and kvpress rows from a run with enough (cut.json); a row of other bases runs anew
    (short,) = json.loads((tmp_path / "r1.json").read_text())
    for label in ("kv pca", "kv pca press"):
        row = _row(short, label, 0.5)
        assert len(row["bases"]) == 16 and all(len(c["match"]) == 1 for c in row["cells"].values())
        row["ppl"] = None
        for cell in row["cells"].values():
            cell["ll"] = [123.0]
    _row(short, "kv pca press", 0.5)["bases"] = "0" * 16
    (tmp_path / "short.json").write_text(json.dumps([short]))
    on = _bench(*common, "--samples", "2", "--batch", "1", "--projections", "pca@0.5", "--resume",
                f"{tmp_path / 'short.json'},{tmp_path / 'cut.json'}", "--json", tmp_path / "r4.json")  # fmt: skip
    assert on.returncode == 0, on.stderr[-3000:]
    (went_on,) = [
        line for line in on.stdout.splitlines() if "kv pca at b=0.5 goes on from the samples held: " in line
    ]
    held = went_on.split("held: ")[1].split(", ")
    assert len(held) == 5 and all(cell.endswith("@512 1") for cell in held), went_on
    assert "kv pca press at b=0.5 ran on other bases: run anew" in on.stdout
    (fourth,) = json.loads((tmp_path / "r4.json").read_text())
    assert str(tmp_path / "cut.json") in fourth["stock_from"]
    for label in ("kv pca", "kv pca press"):
        whole, now = _row(model, label, 0.5), _row(fourth, label, 0.5)
        assert now["ppl"] == pytest.approx(whole["ppl"], rel=1e-4) and now["bases"] == whole["bases"]
        for key, cell in now["cells"].items():
            assert len(cell["match"]) == 2 and len(cell["b"]) == 2
            assert cell["ll"][1] == pytest.approx(whole["cells"][key]["ll"][1], abs=1e-3)
            assert cell["ll"][0] == (
                123.0 if label == "kv pca" else pytest.approx(whole["cells"][key]["ll"][0], abs=1e-3)
            )
    # the shorter run alone, as if cut short in its kvpress step: its dense and kvpress rows go on from its one
    # sample too (a sentinel marks it), so a long run can be finished over several sittings
    _row(short, "think", 0.5)["cells"]["filler@512"]["ll"] = [321.0]  # not an eviction press
    short.pop("best_press")
    (tmp_path / "short.json").write_text(json.dumps([short]))
    alone = _bench(*common, "--samples", "2", "--batch", "1", "--projections", "pca@0.5", "--resume",
                   tmp_path / "short.json", "--json", tmp_path / "r5.json")  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    (fifth,) = json.loads((tmp_path / "r5.json").read_text())
    # short.json carried them from r.json: its own record of where they came from stands, then this run
    assert fifth["stock_from"].startswith(f"{tmp_path / 'r.json'}, ")
    assert "; gone on with in this run (" in fifth["stock_from"]
    for m in fifth["methods"]:
        if m["side"] in ("dense", "kvpress"):
            whole = _row(model, m["label"], m["budget"])
            assert m["ppl"] == whole["ppl"]  # carried, not run again
            for key, cell in m["cells"].items():
                assert len(cell["match"]) == 2 and len(cell["b"]) == 2
                sentinel = (m["label"], m["budget"], key) == ("think", 0.5, "filler@512")
                assert cell["ll"][0] == (321.0 if sentinel else whole["cells"][key]["ll"][0])
                assert cell["ll"][1] == pytest.approx(whole["cells"][key]["ll"][1], abs=1e-3)
    assert set(fifth["best_press"]) == {"0.75", "0.5"}  # the kvpress step finished here
    other = _bench(*common, "--samples", "1", "--seed", "1", "--resume", tmp_path / "r.json")
    assert other.returncode == 2 and "holds no run of" in other.stderr
    # a run cut short in its dense step: what it saved holds the carried projection rows and ranks, so the next
    # --resume of it still has them
    import kv_recall

    argv = [*map(str, common), "--samples", "2", "--batch", "1", "--projections", "pca@0.5"]
    args = kv_recall.parse_args([*argv, "--resume", str(tmp_path / "short.json")])
    saved, results = [], []

    class Cut(Exception):
        pass

    def cut() -> None:
        saved.append(json.loads(json.dumps(results)))
        raise Cut

    with pytest.raises(Cut):
        kv_recall.run_model(str(common[1]), args, args.budget_list, results, cut)
    (partial,) = saved[0]
    assert "best_press" not in partial and partial["ranks"] == short["ranks"]
    ours = [(m["label"], m["budget"]) for m in short["methods"] if m["side"] == "llmsurgery"]
    assert ours and set(ours) <= {(m["label"], m["budget"]) for m in partial["methods"]}
    assert partial["stock_from"].startswith(f"{tmp_path / 'r.json'}, ")  # where its first samples came from
    (tmp_path / "partial.json").write_text(json.dumps([partial]))
    shown = _bench("--report", tmp_path / "partial.json", block_kvpress=True)
    assert shown.returncode == 0 and "its kvpress step did not run or did not finish" in shown.stdout, (
        shown.stderr
    )
    # a chain: r5.json went on with short.json's rows; a run resuming r5.json says that r5.json's run did
    args = kv_recall.parse_args([*argv, "--resume", str(tmp_path / "r5.json")])
    (described,) = kv_recall._earlier_run(args, str(common[1]), {}, sliding=False)["described"].values()
    assert (
        described.startswith(f"{tmp_path / 'r.json'}, ")
        and f"gone on with in {tmp_path / 'r5.json'}, " in described
    )
    # a file whose dense and kvpress rows hold no samples lent none: this run, which fills those very entries,
    # does not name it
    for m in short["methods"]:
        if m["side"] in ("dense", "kvpress"):
            m["cells"] = {key: {"match": [], "ll": [], "b": []} for key in m["cells"]}
    (tmp_path / "empty.json").write_text(json.dumps([short]))
    one = [*map(str, common), "--samples", "1", "--projections", "pca@0.5"]
    args = kv_recall.parse_args([*one, "--resume", str(tmp_path / "empty.json")])
    results = []
    kv_recall.run_model(str(common[1]), args, args.budget_list, results, lambda: None)
    assert all(_done_here(m) == 1 for m in results[0]["methods"] if m["side"] in ("dense", "kvpress"))
    assert "stock_from" not in results[0], results[0]["stock_from"]


@pytest.mark.kvpress
def test_recent_keeps_the_last_context_keys_exact_and_pays_for_them(tiny_models, tmp_path):
    """--recent 16 on a tiny Llama, 256 tokens: the keys-only rows keep the context's last 16 keys exact, the
    model rows through exact_recent (their runtime says so), the press rows by hand, with the same answers; alone
    they store 0.75 + 16 / (2 x 256) of the dense KV, counted on the cache, and composed the eviction pays for the
    16 so that b holds."""
    result = _bench(
        "--models", tiny_models["llama"], "--lengths", "256", "--samples", "2", "--budgets", "0.75,0.5",
        "--tasks", "filler", "--projections", "pairs@keys", "--recent", "16", "--calib", "pydoc", "--all-cells",
        "--no-ppl", "--json", tmp_path / "r.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (model,) = json.loads((tmp_path / "r.json").read_text())
    best = model["best_press"]["0.5"]
    alone, composed = (
        "kv pairs keys only + last 16 exact",
        f"kv pairs keys only p=0.75 + {best} + last 16 exact",
    )
    pressed = {
        alone: "kv pairs keys only press + last 16 exact",
        composed: f"kv pairs keys only press p=0.75 + {best} + last 16 exact",
    }
    for label, budget in ((alone, 0.75), (composed, 0.5)):
        row, press = _row(model, label, budget), _row(model, pressed[label], budget)
        assert row["runtime"] == "project_context_only, exact_recent=16"
        assert row["cells"]["filler@256"]["ll"] == pytest.approx(press["cells"]["filler@256"]["ll"], abs=1e-3)
        for r in (row, press):
            (b,) = r["cells"]["filler@256"]["b"]
            if budget == 0.75:
                assert b == pytest.approx(0.75 + 16 / 512, abs=1e-4), r["label"]
            else:
                assert budget - 0.01 < b <= budget + 1e-6, (r["label"], b)
    assert alone in result.stdout


@pytest.mark.kvpress
def test_state_dir_reuses_trained_bases_only_with_the_same_training_settings(tiny_models, tmp_path):
    common = ["--models", tiny_models["llama"], "--lengths", "512", "--samples", "1", "--budgets", "0.75",
              "--train-samples", "8", "--calib", "pydoc", "--all-cells", "--no-ppl", "--tasks", "filler",
              "--projections", "trained@keys", "--state-dir", tmp_path / "state"]  # fmt: skip
    first = _bench(*common, "--train-steps", "2", "--json", tmp_path / "a.json")
    assert first.returncode == 0, first.stderr[-3000:]
    assert [p.name for p in (tmp_path / "state").iterdir()] == [
        f"{Path(tiny_models['llama']).name}-trained.pt"
    ]
    again = _bench(*common, "--train-steps", "2", "--json", tmp_path / "b.json")
    assert again.returncode == 0 and "loaded the trained bases" in again.stdout
    (a,), (b,) = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert _row(b, "kv trained keys only", 0.75)["bases"] == _row(a, "kv trained keys only", 0.75)["bases"]
    other = _bench(*common, "--train-steps", "3")  # bases trained otherwise: refused before any work
    assert other.returncode == 2 and other.stdout == "" and other.stderr.count("\n") == 1
    assert "trained with other settings" in other.stderr and "'steps': 2" in other.stderr
    placed = _bench(*common, "--train-steps", "2", "--positions", "1024")  # windows placed otherwise
    assert (
        placed.returncode == 2
        and "trained with other settings" in placed.stderr
        and "'positions': 1024" in placed.stderr
    )
    (tmp_path / "state" / f"{Path(tiny_models['llama']).name}-trained.pt").write_bytes(b"not a state")
    corrupt = _bench(*common, "--train-steps", "2")
    assert corrupt.returncode == 2 and corrupt.stdout == "" and corrupt.stderr.count("\n") == 1
    assert "cannot read" in corrupt.stderr


def test_a_row_batched_otherwise_is_cut_back_to_the_batch_it_lacks():
    import kv_recall

    m = kv_recall.Method("llmsurgery", "kv pca", 0.5, model="pca@0.5")
    m.entry["cells"]["filler@512"] = {"match": [100.0] * 3, "ll": [-0.1] * 3, "b": [0.5, 0.4]}
    assert kv_recall._cell_(m, "filler@512", 0, 2) is None  # covered
    assert kv_recall._cell_(m, "filler@512", 3, 3)["match"] == [100.0] * 3  # the next batch: kept as it is
    # reaches into this batch without covering it: cut back to it (batches of 2: the partial one's b dropped)
    cell = kv_recall._cell_(m, "filler@512", 2, 2)
    assert cell == {"match": [100.0] * 2, "ll": [-0.1] * 2, "b": [0.5]}
    assert kv_recall._cell_(m, "news@512", 0, 2) == {"match": [], "ll": [], "b": []}


def _done_here(entry: dict) -> int:
    return min(len(cell["match"]) for cell in entry["cells"].values())


def _row(result: dict, label: str, budget: float) -> dict:
    return next(m for m in result["methods"] if (m["label"], m["budget"]) == (label, budget))


def test_resume_of_a_sliding_window_model_needs_window_safe_presses(tmp_path):
    """kvpress's own presses scored 0 on Gemma3's sliding-window layers: an earlier run of such a model carries
    over only if its presses were window-safe; a model without sliding windows carries either."""
    import kv_recall

    from llmsurgery.errors import UserError

    path = tmp_path / "r.json"
    path.write_text("[]")
    args = kv_recall.parse_args(["--models", "m", "--samples", "1", "--resume", str(path)])
    earlier = {"model": "m", "best_press": {}, "settings": kv_recall._settings(args), "methods": []}
    path.write_text(json.dumps([earlier]))
    assert kv_recall._earlier_run(args, "m", {}, sliding=False) is not None
    with pytest.raises(UserError, match="holds no run of m whose settings cover these"):
        kv_recall._earlier_run(args, "m", {}, sliding=True)
    path.write_text(json.dumps([earlier | {"presses": kv_recall.PRESSES}]))
    assert kv_recall._earlier_run(args, "m", {}, sliding=True) is not None


def test_resume_carries_projection_rows_only_of_bases_calibrated_and_trained_alike(tmp_path, capsys):
    """Finished projection rows of an earlier run stand for this run's only if its bases came from the same
    calibration and training (recorded as "training"); its dense and kvpress rows carry over either way."""
    import kv_recall

    path = tmp_path / "r.json"
    path.write_text("[]")
    args = kv_recall.parse_args(["--models", "m", "--samples", "1", "--resume", str(path)])
    rows = [
        {"side": side, "label": label, "budget": 0.5, "cells": {}}
        for side, label in (("kvpress", "tova"), ("llmsurgery", "kv trained keys only"))
    ]
    earlier = {"model": "m", "best_press": {}, "settings": kv_recall._settings(args), "methods": rows}
    earlier |= {key: {"trained@keys": 1} for key in ("reached", "ranks", "overhead_bytes", "train")}
    alike = kv_recall._training_settings(kv_recall.kv_config(args))
    for training, carried in ((alike, {"kvpress", "llmsurgery"}), (None, {"kvpress"})):
        path.write_text(json.dumps([earlier | {"training": training}]))
        for calib, sides in (("news", carried), ("news+pydoc", {"kvpress"})):
            args.calib = calib
            earlier_run = kv_recall._earlier_run(args, "m", {}, sliding=False)
            assert {side for side, _, _ in earlier_run["entries"]} == sides
            # the ranks, budgets, overheads and training record of bases made otherwise do not carry over either
            assert bool(earlier_run["result"]["ranks"]) == ("llmsurgery" in sides)
            assert ("train" in earlier_run["result"]) == ("llmsurgery" in sides)
            assert ("its projection rows not carried" in capsys.readouterr().out) == (sides == {"kvpress"})


def _layer_types(*args, block_kvpress=False):
    return _bench(*args, block_kvpress=block_kvpress, script="kv_layer_types.py")


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("kv_layer_types.py", (), "kvpress presses need the kvpress extra: pip install -e .[kvpress]"),
        ("kv_layer_types.py", ("--tasks", "filler,nope"), "--tasks: choose from"),
        ("kv_layer_types.py", ("--length", "64"), "--length at least 128 tokens"),
        (
            "kv_layer_types.py",
            ("--windowed-budgets", "0.5,1.5"),
            "--windowed-budgets takes comma-separated shares between 0 and 1",
        ),
        ("kv_layer_depth.py", (), "kvpress presses need the kvpress extra: pip install -e .[kvpress]"),
        ("kv_layer_depth.py", ("--tasks", "pydoc,nope"), "--tasks: choose from"),
        ("kv_layer_depth.py", ("--length", "64"), "--length at least 128 tokens"),
        ("kv_layer_depth.py", ("--block", "-1"), "--block must be 0 (no block rows) or more layers"),
        ("kv_layer_depth.py", ("--whole", "5-2"), "--whole takes a layer range A-B (A <= B), not '5-2'"),
        (
            "kv_layer_depth.py",
            ("--haystack", __file__, "--tasks", "pydoc"),
            "--haystack replaces the pydoc haystack",
        ),
        ("kv_layer_depth.py", ("--json", "/nonexistent/rows.json"), "cannot write /nonexistent/rows.json"),
        ("kv_positions.py", ("--spans", "0,2k"), "--spans takes whole numbers and --keep fractions"),
        (
            "kv_positions.py",
            ("--keep", "0.5,1"),
            "--keep takes fractions of head_dim strictly between 0 and 1",
        ),
        ("kv_positions.py", ("--spans", "300"), "--positions 300 is shorter than the 512-token calibration"),
        ("kv_positions.py", ("--length", "64"), "--length at least 128 tokens"),
    ],
)
def test_layer_scripts_bad_input_is_one_error_line(script, args, message):
    result = _bench(*args, block_kvpress=True, script=script)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr


@pytest.mark.kvpress
def test_layer_types_splits_the_projection_by_layer_type(tiny_models, tmp_path):
    """benchmarks/kv_layer_types.py on a tiny Gemma3 (layers 2 and 5 full attention, window 8): each row stores
    what its ranks say, counted on the cache; at each windowed budget TOVA alone and the full-attention projection
    composed with TOVA hold at most that share of a windowed cache (within a token a layer), the composition
    evicting fewer tokens; a model without sliding layers is refused in one line."""
    result = _layer_types(
        "--model", tiny_models["gemma3_text"], "--length", "256", "--samples", "1", "--tasks", "filler",
        "--calib", "pydoc", "--windowed-budgets", "0.6,0.5", "--json", tmp_path / "rows.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["label"]: row for row in json.loads((tmp_path / "rows.json").read_text())}
    assert "full keys d/2, sliding whole" in result.stdout
    # per KV head of a layer, r_k + r_v of 2d: full layers (2 of 6) at d/2 + d, sliding ones whole
    row = rows["full keys d/2, sliding whole"]
    assert row["budget"] == pytest.approx((2 * 1.5 + 4 * 2) / 12, abs=1e-4)
    assert row["full_layers_share"] == pytest.approx(0.75)
    assert row["cells"]["filler@256"]["b"] == [pytest.approx(row["budget"], abs=1e-3)]
    assert rows["sliding keys d/2, full whole"]["full_layers_share"] == 1.0
    # a windowed cache of 256 tokens: 4 sliding layers hold 7 tokens each, 2 full-attention layers 256
    dense_windowed = 4 * 7 + 2 * 256
    assert rows["dense"]["cells"]["filler@256"]["bw"] == [pytest.approx(1.0)]
    alone = rows["full keys d/4, sliding whole"]["cells"]["filler@256"]["bw"][0]
    assert alone == pytest.approx((4 * 7 + 2 * 256 * 0.625) / dense_windowed, abs=1e-4)
    assert "windowed b=0.6444: kvpress " in result.stdout  # TOVA at the projection's own share
    # random weights score 0 everywhere: the closing lines fall back to every task, and say so
    assert "the lines below average filler@256 (dense at least 85, else every task)" in result.stdout
    for target in (0.6, 0.5):
        tova = [r for r in rows.values() if r["label"].startswith("tova c=") and r["budget"] == target]
        ours = [
            r
            for r in rows.values()
            if r["label"].startswith("full keys d/4 + tova") and r["budget"] == target
        ]
        assert len(tova) == len(ours) == 1, sorted(rows)
        evicted = [float(r["label"].rsplit("=", 1)[1]) for r in (tova[0], ours[0])]
        assert evicted[1] < evicted[0], evicted
        for r in (tova[0], ours[0]):
            share = r["cells"]["filler@256"]["bw"][0]
            assert target - 6 / dense_windowed < share <= target + 1e-6, (r["label"], share)
        assert f"windowed b={target:g}: kvpress " in result.stdout
    refused = _layer_types("--model", tiny_models["llama"], "--samples", "1")
    assert refused.returncode == 2 and refused.stderr.endswith(
        "does not mix sliding-window and full-attention layers\n"
    )


def _layer_depth(*args, block_kvpress=False):
    return _bench(*args, block_kvpress=block_kvpress, script="kv_layer_depth.py")


@pytest.mark.kvpress
def test_layer_depth_keeps_each_block_of_layers_whole_in_turn(tiny_models, tmp_path):
    """benchmarks/kv_layer_depth.py on a tiny Llama of 6 layers, blocks of 4: keys d/2 on every layer stores 3/4 of
    the dense KV (per KV head r_k + r_v = d/2 + d of 2d), and a block kept whole stores its layers' keys whole;
    both counted on the replayed cache; `--whole 1-1` keeps layer 1 whole at 3/4, the others narrower."""
    result = _layer_depth(
        "--model", tiny_models["llama"], "--length", "256", "--samples", "1", "--tasks", "filler",
        "--block", "4", "--whole", "1-1", "--bases", "pca", "--calib", "pydoc", "--json", tmp_path / "rows.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["label"]: row for row in json.loads((tmp_path / "rows.json").read_text())}
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    expected = {
        "dense": 1.0,
        "keys d/2 on every layer": 0.75,
        "layers 0-3 keys whole": (4 * 2 + 2 * 1.5) / 12,
        "layers 4-5 keys whole": (2 * 2 + 4 * 1.5) / 12,
        # layer 1 whole at the same budget: layer 0 keeps d/2, layers 2-5 3d/8 (rank steps of d/8)
        f"layers 1-1 whole, others {3 * d // 8}/{d // 2} of {d}": 0.75,
    }
    assert set(rows) == set(expected)
    for label, share in expected.items():
        assert rows[label]["cells"]["filler@256"]["b"] == [pytest.approx(share, abs=1e-3)], label
        assert label in result.stdout


def test_positions_benchmark_measures_what_placed_windows_win_far_out(tiny_models, tmp_path):
    """benchmarks/kv_positions.py on a tiny Llama (context 1024): a row per span and kept rank, a share per position
    bin; the keys beyond the calibration windows' 512 positions lose less to bases fitted within 1024 positions than
    to bases fitted at 0; a span beyond the model's context is refused in one line."""
    out = tmp_path / "positions.json"
    args = ("--model", tiny_models["llama"], "--length", "1024", "--samples", "1", "--spans", "0,1024")
    result = _bench(*args, "--keep", "0.5", "--json", out, script="kv_positions.py")
    assert result.returncode == 0, result.stderr
    found = json.loads(out.read_text())
    assert found["bins"] == [0, 256, 512, 1024]
    rows = {row["positions"]: row["lost"] for row in found["rows"]}
    assert sorted(rows) == [0, 1024] and all(
        len(lost) == 3 and all(0 < x < 1 for x in lost) for lost in rows.values()
    )
    assert rows[1024][2] < rows[0][2], rows
    refused = _bench("--model", tiny_models["llama"], "--spans", "2048", script="kv_positions.py")
    lines = refused.stderr.strip().splitlines()  # refused from the config, before the model loads
    last = lines[-1]
    assert refused.returncode == 2 and len(lines) == 1 and last.startswith("error: --spans: 2048")
    assert last.endswith("is beyond the model's context of 1024 tokens") and "Traceback" not in refused.stderr
