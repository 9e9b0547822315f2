"""What installing getam gives: the core install (`pip install getam`) carries what the library, training and evaluation
import and none of the notebook stack, which is the `notebooks` extra; the README's test command installs everything the
full test set needs, and the one test it cannot (the real browser) says how to get what it lacks. The wheel itself is
tested by .ci/wheel-test (run in CI), with its core dependencies only in a venv of its own."""
import ast, re, sys, tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import torch

import test_widgets

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# the notebook stack (distributions) and the modules they bring that getam's own code may want
NOTEBOOK_STACK = {"jupyterlab", "notebook", "jupyter", "papermill", "ipykernel", "ipython", "ipywidgets", "nbdev",
                  "seaborn", "pandas"}
NOTEBOOK_MODULES = {"jupyterlab", "notebook", "jupyter", "papermill", "ipykernel", "IPython", "ipywidgets", "nbdev",
                    "seaborn", "pandas"}
IMPORT_NAMES = {"PIL": "pillow"}   # where the import name is not the distribution's, for modules not installed here


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(reqs: list[str], extras: dict[str, list[str]] | None = None) -> set[str]:
    "Distribution names of `reqs`; a `getam[a,b]` entry stands for the getam extras it names."
    names = set()
    for r in reqs:
        name = _norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0])
        if name == "getam" and extras is not None:
            for extra in re.search(r"\[(.*)\]", r).group(1).split(","): names |= _names(extras[extra.strip()], extras)
        else: names.add(name)
    return names


def _imports(path: Path, inside_functions: bool = False) -> set[str]:
    "Top-level names of the absolute imports of a module: those that run when it is imported, or all of them."
    found = set()
    def visit(node):
        for child in ast.iter_child_nodes(node):
            if not inside_functions and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)): continue
            if isinstance(child, ast.Import): found.update(a.name.split(".")[0] for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0: found.add(child.module.split(".")[0])
            visit(child)
    visit(ast.parse(path.read_text()))
    return found


def _sources() -> list[Path]:
    return sorted(p for p in (ROOT / "getam").rglob("*.py") if p.name != "_modidx.py")


def test_readme_test_command_installs_what_the_tests_import():
    """`pip install -e \".[dev]\" && pytest -q`: the dev extra brings pytest, the notebook stack, the dense CRF and the
    browser driver."""
    extras = PROJECT["optional-dependencies"]
    assert {"pytest", "pydensecrf2", "playwright", "ruff"} <= _names(extras["dev"], extras)
    assert _names(extras["notebooks"]) <= _names(extras["dev"], extras)
    assert 'pip install -e ".[dev]" && pytest -q' in (ROOT / "README.md").read_text()


def test_core_dependencies_leave_the_notebook_stack_out():
    "`pip install getam` brings no jupyterlab, papermill, nbdev, ipywidgets or seaborn: they are the `notebooks` extra."
    core, extras = _names(PROJECT["dependencies"]), PROJECT["optional-dependencies"]
    assert not core & NOTEBOOK_STACK, core & NOTEBOOK_STACK
    assert ({"jupyterlab", "papermill", "ipykernel", "ipywidgets", "nbdev", "seaborn", "pandas"}
            <= _names(extras["notebooks"]))
    assert {"notebooks", "crf", "compare", "dev"} <= set(extras)
    assert 'pip install -e ".[notebooks]"' in (ROOT / "README.md").read_text()   # the main job runs through papermill


def _words(text: str) -> set[str]:
    return {_norm(w) for w in re.findall(r"[\w.-]+", text)} - {"and"}


def test_readme_says_what_each_install_holds():
    """The Quick start names the core's distributions and, row by row, each extra's
    (a `getam[a,b]` entry of dev by its extras)."""
    readme, extras = (ROOT / "README.md").read_text(), PROJECT["optional-dependencies"]
    core = re.search(r"is the core — (.*?) — enough for", readme, re.S).group(1)
    assert _words(core) == _names(PROJECT["dependencies"])
    for extra, reqs in extras.items():
        row = re.search(rf"^\| `{extra}` \| (.*?) \|", readme, re.M)
        assert row, f"the README's table of extras has no row for {extra}"
        expected = {_norm(e) for r in reqs if r.startswith("getam[")
                    for e in re.search(r"\[(.*)\]", r).group(1).split(",")}
        expected |= _names([r for r in reqs if not r.startswith("getam[")])
        assert _words(row.group(1)) == expected, (extra, row.group(1))


def test_every_module_top_import_is_a_core_dependency():
    """Importing any getam module needs only the core install: each third-party module imported at module top is a
    core dependency's."""
    core, dists = _names(PROJECT["dependencies"]), packages_distributions()
    stray = {}
    for path in _sources():
        for mod in _imports(path) - set(sys.stdlib_module_names) - {"getam"}:
            provided_by = {_norm(d) for d in dists.get(mod, [IMPORT_NAMES.get(mod, mod)])}
            if not provided_by & core: stray[f"{path.relative_to(ROOT)}: {mod}"] = sorted(provided_by)
    assert not stray, ("module-top imports that no core dependency provides "
                       f"(move them into the function, via require_extra): {stray}")
    # the parse finds them
    assert {"torch", "timm", "PIL", "safetensors", "scipy"} <= set().union(*map(_imports, _sources()))


def test_notebook_stack_is_imported_only_through_require_extra():
    """No import statement in getam/ names a notebook-stack module, even inside a function: `require_extra` imports
    them and names the extra."""
    found = {f"{p.relative_to(ROOT)}: {m}" for p in _sources()
             for m in _imports(p, inside_functions=True) & NOTEBOOK_MODULES}
    assert not found, found


def test_without_the_notebook_extra(monkeypatch, tmp_path):
    """With seaborn, pandas and ipywidgets missing, the training curves still draw; a table, a seaborn plot and the
    explorer name the extra."""
    from getam.metrics import ConfusionMatrix, iou_table, plot_iou
    from getam.train.singlestage import plot_curves
    from getam.utils import MissingExtra
    from getam.widgets import LayerExplorer
    for mod in ("seaborn", "pandas", "ipywidgets"):
        monkeypatch.setitem(sys.modules, mod, None)   # import raises ImportError
    log = [dict(step=s, phase=1 + (s >= 2), cls_loss=1.0 / (s + 1), seg_loss="" if s < 2 else 0.5, sal_loss="")
           for s in range(4)]
    fig = plot_curves(log, [dict(step=3, val_miou=0.4)], tmp_path / "curves.png")
    losses, val = fig.axes
    assert [line.get_label() for line in losses.lines] == ["cls_loss", "seg_loss", "segmentation on"]
    assert list(losses.lines[1].get_xdata()) == [2.0, 3.0] and list(val.lines[0].get_ydata()) == [0.4]
    assert (tmp_path / "curves.png").stat().st_size > 0
    cm = ConfusionMatrix(2).update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    for call, who in [(lambda: iou_table(cm), "iou_table needs pandas"),
                      (lambda: plot_iou(cm), "plot_iou needs seaborn"),
                      (lambda: LayerExplorer(None, []), "LayerExplorer needs ipywidgets")]:
        with pytest.raises(MissingExtra, match=re.escape(f'{who}, which the core install of getam leaves out: '
                                                         'pip install "getam[notebooks]"')):
            call()


def test_cuda_marker_is_registered():
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("cuda:") for m in markers)


def test_browser_test_without_chromium_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(test_widgets, "CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(pytest.skip.Exception) as e:
        test_widgets.test_explorer_renders_in_jupyterlab_in_chromium(None, tmp_path)
    assert "apt-get install chromium" in str(e.value) and "no-chromium" in str(e.value)
