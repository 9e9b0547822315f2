"""The package is three rooms, each layered (README: "The notebooks, room by room"). The library (`getam/`) never
imports training (`getam.train`) or reproduction (`getam.repro`); training never imports reproduction; inside the
library a module imports only from its own layer or the layers below; every import of a getam module sits at module
top; and the imports between getam's modules form no circle."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "getam"

LIBRARY_LAYERS = {
    0: ["config", "utils", "classes", "images"],                                   # foundations
    1: ["data", "synth", "hf", "backbones"],                                       # data, models to explain
    2: ["cams", "attribution", "pamr", "completion", "crf", "metrics", "faithfulness"],  # the method
    3: ["model", "deeplab"],                                                       # models
    4: ["explain", "widgets"],                                                     # explaining a model
}
ROOMS = {"library": 0, "train": 1, "repro": 2}      # a room imports only from itself and the rooms before it
LAYER = {m: k for k, ms in LIBRARY_LAYERS.items() for m in ms}


def room(mod: str) -> str:
    "`train.loop` -> train, `repro.bench` -> repro, `cams` -> library."
    head = mod.split(".")[0]
    return head if head in ROOMS else "library"


def modules() -> list[str]:
    "Dotted names under getam/: `cams`, `train.loop`, `repro.bench`; `__init__` and `__main__` too (`train.__main__`)."
    out = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).with_suffix("")
        if rel.name.startswith("_") and rel.name not in ("__init__", "__main__"): continue
        out.append(".".join(rel.parts))
    return out


def _from(mod: str, node: ast.ImportFrom) -> list[str] | None:
    "What `from X import ...` in `mod` imports from, as parts relative to getam (`[]`: getam itself); None: not getam."
    if node.level:
        package = mod.split(".")[:-1]
        base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
        return base + (node.module.split(".") if node.module else [])
    if node.module and (node.module == "getam" or node.module.startswith("getam.")):
        return node.module.split(".")[1:]
    return None


def _resolve(mod: str, node: ast.ImportFrom) -> list[str]:
    "The getam modules an import names, as dotted names relative to getam (relative imports resolved from `mod`)."
    prefix = _from(mod, node)
    if prefix is None: return []
    names = []
    for alias in node.names:        # `from getam.train import loop` names the module train.loop
        dotted = ".".join(prefix + [alias.name])
        names.append(dotted if (PKG / (dotted.replace(".", "/") + ".py")).is_file() else ".".join(prefix))
    return [n for n in names if n]


def getam_imports(mod: str) -> list[tuple[str, int, bool]]:
    "(imported getam module, line, at module top) for every import of a getam module in `mod`."
    tree = ast.parse((PKG / (mod.replace(".", "/") + ".py")).read_text())
    top = {id(n) for n in tree.body} | {id(n) for b in tree.body if isinstance(b, ast.If) for n in b.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            names = _resolve(mod, node)
        elif isinstance(node, ast.Import):
            names = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("getam.")]
        for n in names:
            if not n.split(".")[-1].startswith("_") or n.endswith("__init__"):
                out.append((n, node.lineno, id(node) in top))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {n for n, _, _ in getam_imports(m) if n != m} for m in modules()}


def test_every_library_module_has_a_layer_and_every_module_a_room():
    lib = [m for m in modules() if room(m) == "library" and m != "__init__"]
    assert [m for m in lib if m not in LAYER] == []
    assert {room(m) for m in modules()} == set(ROOMS)


@pytest.mark.parametrize("mod", modules())
def test_imports_respect_rooms_and_layers_and_sit_at_the_top(mod):
    up_rooms = [(n, line) for n, line, _ in getam_imports(mod) if ROOMS[room(n)] > ROOMS[room(mod)]]
    assert not up_rooms, f"getam.{mod} ({room(mod)} room) imports from a later room: {up_rooms}"
    if room(mod) == "library" and mod in LAYER:
        up = [(n, line) for n, line, _ in getam_imports(mod) if room(n) == "library" and LAYER.get(n, 99) > LAYER[mod]]
        assert not up, f"getam.{mod} (layer {LAYER[mod]}) imports from higher layers: {up}"
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


def test_the_checker_sees_a_circle_an_upward_import_and_a_crossed_room(tmp_path, monkeypatch):
    "The checks above can fail: on a made-up package with a circle (a <-> b), an upward import and a crossed room."
    (tmp_path / "train").mkdir()
    (tmp_path / "config.py").write_text("from .cams import x\n")
    (tmp_path / "cams.py").write_text("from getam.config import y\nfrom getam.train.loop import z\n")
    (tmp_path / "train" / "loop.py").write_text("from ..utils import w\n")
    (tmp_path / "utils.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path)
    assert graph() == {"cams": {"config", "train.loop"}, "config": {"cams"}, "train.loop": {"utils"}, "utils": set()}
    with pytest.raises(AssertionError, match="import circle"): test_no_import_circles()
    check = test_imports_respect_rooms_and_layers_and_sit_at_the_top
    with pytest.raises(AssertionError, match="higher layers"): check("config")
    with pytest.raises(AssertionError, match="later room"): check("cams")
    check("train.loop")


# ---------------------------------------------------------------- no private name crosses a module
# A `_name` is its module's own business: a module that needs it from another one makes it public there. An import
# that still does it, while its notebook is being changed, goes into PENDING_PRIVATE with what is left to do.
PENDING_PRIVATE: dict = {}   # none left; an entry is (module, source module, name): "what to do"


def private_imports(mod: str) -> list[tuple[str, str, int]]:
    "(getam module, `_name`, line) for every `from <another getam module> import _name` in `mod` (multi-line too)."
    tree = ast.parse((PKG / (mod.replace(".", "/") + ".py")).read_text())
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or (prefix := _from(mod, node)) is None: continue
        source = ".".join(prefix) or "__init__"
        if source == mod: continue
        private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
        out += [(source, name, node.lineno) for name in private]
    return out


@pytest.mark.parametrize("mod", modules())
def test_no_private_name_crosses_a_module(mod):
    crossing = [(f"{source}.{name}", line) for source, name, line in private_imports(mod)
                if (mod, source, name) not in PENDING_PRIVATE]
    assert not crossing, f"getam.{mod} imports private names of other modules (make them public there): {crossing}"


def test_the_pending_private_imports_still_happen():
    "An entry of PENDING_PRIVATE whose import is gone is done: drop it, so that the list says what is left."
    found = {(mod, source, name) for mod in modules() for source, name, _ in private_imports(mod)}
    assert not set(PENDING_PRIVATE) - found, f"done, drop from PENDING_PRIVATE: {sorted(set(PENDING_PRIVATE) - found)}"


def test_the_private_name_check_can_fail(tmp_path, monkeypatch):
    "A made-up package: a relative, an absolute and a multi-line import of private names are caught; its own are not."
    (tmp_path / "train").mkdir()
    (tmp_path / "cams.py").write_text("from .utils import _helper, public\nfrom .cams import _own\n"
                                      "from getam import __doc__\n")
    (tmp_path / "utils.py").write_text("def _helper(): pass\n")
    (tmp_path / "train" / "loop.py").write_text("from getam.cams import (\n    getam,\n    _floor as floor,\n)\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path)
    assert private_imports("cams") == [("utils", "_helper", 1)]
    assert private_imports("train.loop") == [("cams", "_floor", 1)]
    with pytest.raises(AssertionError, match=r"utils\._helper"): test_no_private_name_crosses_a_module("cams")
    with pytest.raises(AssertionError, match=r"cams\._floor"): test_no_private_name_crosses_a_module("train.loop")
    test_no_private_name_crosses_a_module("utils")
    monkeypatch.setitem(PENDING_PRIVATE, ("train.loop", "cams", "_floor"), "a pending one passes")
    test_no_private_name_crosses_a_module("train.loop")
