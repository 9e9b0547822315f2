"""The package is layered as the table "The notebooks, layer by layer" of nbs/index.ipynb (and README.md) shows: a
module imports only from its own layer or the layers below, at module top, and the imports between getam's modules form
no circle."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "getam"

LAYERS = {
    0: ["config", "utils", "classes", "images"],                                   # foundations
    1: ["data", "synth", "backbones"],                                             # data
    2: ["cams", "pamr", "completion", "crf", "metrics", "faithfulness"],           # the method
    3: ["model", "deeplab"],                                                       # models
    4: ["losses", "loop", "step", "infer", "train", "multistage", "classify", "pretrain"],   # training
    5: ["evaluate", "experiments", "reproduce", "widgets", "bench", "explain", "explainers_bench",  # entry points
        "gpucheck"],
}
LAYER = {m: k for k, ms in LAYERS.items() for m in ms}


def modules() -> list[str]:
    return sorted(p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_"))


def getam_imports(mod: str) -> list[tuple[str, int, bool]]:
    "(imported getam module, line, at module top) for every import of a getam module in `mod`."
    tree = ast.parse((PKG / f"{mod}.py").read_text())
    top = {id(n) for n in tree.body} | {id(n) for b in tree.body if isinstance(b, ast.If) for n in b.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 1: names = [node.module] if node.module else [a.name for a in node.names]
            elif node.module == "getam": names = [a.name for a in node.names]
            elif node.module and node.module.startswith("getam."): names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("getam.")]
        for n in names:
            if n and not n.startswith("_"): out.append((n.split(".")[0], node.lineno, id(node) in top))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {n for n, _, _ in getam_imports(m) if n != m} for m in modules()}


def test_every_module_has_a_layer():
    assert [m for m in modules() if m not in LAYER] == []


@pytest.mark.parametrize("mod", modules())
def test_imports_go_down_and_sit_at_the_top(mod):
    bad = [(n, line) for n, line, _ in getam_imports(mod) if LAYER.get(n, 99) > LAYER[mod]]
    assert not bad, f"getam.{mod} (layer {LAYER[mod]}) imports from higher layers: {bad}"
    inner = [(n, line) for n, line, top in getam_imports(mod) if not top]
    assert not inner, f"getam.{mod} imports getam modules inside functions: {inner}"


def test_no_import_circles():
    g, state, path = graph(), {}, []
    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == "open": raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state: visit(n)
        state[m] = "done"
        path.pop()
    for m in g:
        if m not in state: visit(m)


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    "The checks above can fail: on a made-up package with a circle (a <-> b) and an import from a higher layer."
    (tmp_path / "config.py").write_text("from .train import x\n")
    (tmp_path / "train.py").write_text("from getam.config import y\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path)
    assert graph() == {"config": {"train"}, "train": {"config"}}
    with pytest.raises(AssertionError, match="import circle"): test_no_import_circles()
    with pytest.raises(AssertionError, match="higher layers"): test_imports_go_down_and_sit_at_the_top("config")
