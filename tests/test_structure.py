"""The house's structure: imports run one way, and every per-layer pass walks the layers through one walker."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import run_cli

import llmsurgery
from llmsurgery import layer_walk

PACKAGE = Path(llmsurgery.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """llmsurgery module -> the llmsurgery modules it imports, at the top or inside a function."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[: len(base) - node.level + 1] if node.level else []
                stem = ".".join(base + ([node.module] if node.module else []))
                # `from . import defaults` imports the module llmsurgery.defaults, not the package
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_the_import_graph_has_no_circles():
    graph, state, cycles = import_graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_a_pass_config_imports_its_maths_only_inside_its_methods():
    """passes/<name>/__init__.py stays light (no torch at import); its maths module never imports the config."""
    graph = import_graph()
    for package in sorted(p.parent for p in (PACKAGE / "passes").glob("*/maths.py")):
        name = _module_name(package / "__init__.py")
        assert f"{name}.maths" not in graph[f"{name}.maths"]
        assert name not in graph[f"{name}.maths"] and "llmsurgery.passes" not in graph[f"{name}.maths"]
        top = ast.parse((package / "__init__.py").read_text()).body
        imported = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        heavy = [m for m in imported if m == "torch" or m.startswith("torch.") or m.endswith("maths")]
        assert not heavy, name


STREAMABLE = {
    "prune": ["prune", "--bi", "--remove", "2"],
    "rotate-sparsify": ["rotate-sparsify", "--sparsity", "0.3"],
    "absorb": ["absorb", "--keep-ratio", "0.75"],
    "kv-compress": ["kv-compress", "--budget", "0.5", "--no-train", "--uniform"],
}


@pytest.mark.parametrize("case", list(STREAMABLE))
def test_whole_and_streamed_paths_call_the_one_walker(case, tiny_models, tmp_path, monkeypatch):
    import importlib
    import sys

    # the passes' maths modules are imported on first use: import them now to watch them
    for maths in (PACKAGE / "passes").glob("*/maths.py"):
        importlib.import_module(_module_name(maths))
    calls: list[bool] = []
    walker = layer_walk.walk_layers

    def spy(layers, *args, **kwargs):
        calls.append(layers.streamed)
        return walker(layers, *args, **kwargs)

    for module in [m for n, m in sys.modules.items() if n.startswith("llmsurgery.")]:
        if getattr(module, "walk_layers", None) is walker:
            monkeypatch.setattr(module, "walk_layers", spy)
    command, *options = STREAMABLE[case]
    calib = ["--calib", "pydoc", "--calib-samples", "2", "--calib-seq-len", "32"]
    for stream in ("off", "on"):
        result = run_cli(
            command, tiny_models["llama"], *options, *calib, "--stream", stream, "--output", tmp_path / stream
        )
        assert result.exit_code == 0, result.output
    assert False in calls and True in calls, calls
    assert calls.index(True) > 0 and all(calls[calls.index(True) :]), calls  # the streamed run only streams
