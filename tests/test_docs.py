"""The front page: README.md is made from nbs/index.ipynb and the index lists every notebook; every `getam.x.y` that the
prose cites exists where it says."""
import ast
import importlib
import importlib.util
import inspect
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _make_readme():
    spec = importlib.util.spec_from_file_location("make_readme", ROOT / "tools" / "make_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_is_made_from_the_index_notebook():
    assert (ROOT / "README.md").read_text() == _make_readme().render(), "run python tools/make_readme.py"


def test_the_index_lists_every_notebook():
    text = "".join("".join(c["source"]) for c in json.loads((ROOT / "nbs" / "index.ipynb").read_text())["cells"])
    missing = [p.stem for p in (ROOT / "nbs").glob("*.ipynb") if p.stem != "index" and f"`{p.stem}" not in text]
    assert not missing, f"nbs/index.ipynb does not list {missing}"


def test_render_skips_hidden_cells_and_fences_code(tmp_path):
    cells = [dict(cell_type="markdown", source=["# t"]), dict(cell_type="code", source=["#| hide\nx = 1"]),
             dict(cell_type="code", source=["y = 2"])]
    (tmp_path / "i.ipynb").write_text(json.dumps(dict(cells=cells)))
    assert _make_readme().render(tmp_path / "i.ipynb").endswith("# t\n\n```python\ny = 2\n```\n")


# ---------------------------------------------------------------- names cited in the prose
SPAN = re.compile(r"`([^`\n]+)`")
CITED = re.compile(r"(getam(?:\.[A-Za-z_]\w*)+)(?:\(.*\))?")   # `getam.x.y` or a call `getam.x.y(...)`


def cited_names(text: str) -> list[str]:
    "The dotted `getam.x...` names in backticks in markdown `text` (fenced code blocks are code, not citations)."
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return [m[1] for s in SPAN.findall(text) if (m := CITED.fullmatch(s.strip()))]


def prose() -> list[tuple[str, str]]:
    "(where, text) of every markdown cell of the notebooks and of README.md."
    out = []
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")) + sorted((ROOT / "nbs" / "reproduce").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            if cell["cell_type"] == "markdown":
                out.append((f"{nb.relative_to(ROOT)} cell {i}", "".join(cell["source"])))
    return out + [("README.md", (ROOT / "README.md").read_text())]


def _imported_from(module, attr: str) -> str | None:
    "The module that `module` imports `attr` from (`from .x import attr`, outside functions and classes), or None."
    here = module.__name__.split(".") if hasattr(module, "__path__") else module.__name__.split(".")[:-1]
    body = ast.parse(Path(module.__file__).read_text()).body
    top = [n for n in body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for node in (n for t in top for n in ast.walk(t)):
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == attr for a in node.names):
            base = here[:len(here) - node.level + 1] if node.level else []
            return ".".join(base + ([node.module] if node.module else []))
    return None


def unresolved(name: str) -> str | None:
    """Why the dotted `name` does not resolve, or None when it does: import its longest module prefix, getattr the rest.
    A name cited from a module that only imports it (a re-export) is stale: cite it where it lives. The package's
    top level (`getam.ConfusionMatrix`) is the public API and may re-export."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        modname = ".".join(parts[:k])
        try:
            obj = importlib.import_module(modname)
            break
        except ModuleNotFoundError as e:
            if not (modname + ".").startswith(f"{e.name}."): raise   # a missing dependency: an error, not a stale name
    else: return f"{name}: no module {parts[0]}"
    for attr in parts[k:]:
        if not hasattr(obj, attr): return f"{name}: {getattr(obj, '__name__', obj)} has no attribute {attr!r}"
        parent, obj = obj, getattr(obj, attr)
        # not the package's top level, the public API
        submodule = inspect.ismodule(parent) and "." in parent.__name__
        if submodule and not inspect.ismodule(obj) and (home := _imported_from(parent, attr)):
            return f"{name}: {parent.__name__} only imports it; cite {home}.{attr}"
    return None


def test_names_cited_in_the_prose_resolve():
    "Every `getam.x.y` in the notebooks' markdown and README.md names a thing where it lives (prose that stays true)."
    cited = [(where, name) for where, text in prose() for name in cited_names(text)]
    assert len(cited) >= 100, f"only {len(cited)} cited names found: is the scanner broken?"
    bad = sorted({f"{where}: {why}" for where, name in cited if (why := unresolved(name))})
    assert not bad, "stale names in the prose:\n" + "\n".join(bad)


def test_the_name_check_can_fail(tmp_path, monkeypatch):
    "Made-up prose and a made-up package: a missing attribute, a missing module, a re-export are caught; code is not."
    text = ("`getam.metrics.ConfusionMatrix` and `getam.cams.getam(model, images, labels)`,\n"
            "`getam.metrics.NoSuchThing`, `getam.nosuch.thing`, `python -m getam.train`, `pkg.user.helper`\n"
            "```\n`getam.fenced.name`\n```\n`getam.pamr`")
    assert cited_names(text) == ["getam.metrics.ConfusionMatrix", "getam.cams.getam", "getam.metrics.NoSuchThing",
                                 "getam.nosuch.thing", "getam.pamr"]
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .home import helper\n")
    (tmp_path / "pkg" / "home.py").write_text("def helper(): pass\n")
    (tmp_path / "pkg" / "user.py").write_text("from .home import helper\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for fine in ("getam.metrics.ConfusionMatrix", "getam.cams.getam", "getam.pamr", "getam.pamr.pamr"):
        assert unresolved(fine) is None, fine
    assert unresolved("getam.metrics.Nope") == "getam.metrics.Nope: getam.metrics has no attribute 'Nope'"
    assert unresolved("getam.nosuch.thing") == "getam.nosuch.thing: getam has no attribute 'nosuch'"
    assert unresolved("pkg.user.helper") == "pkg.user.helper: pkg.user only imports it; cite pkg.home.helper"
    assert unresolved("pkg.home.helper") is None and unresolved("pkg.helper") is None     # its home, and the top level
