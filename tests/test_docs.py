"The front page: README.md is made from nbs/index.ipynb, and the index lists every notebook."
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _make_readme():
    spec = importlib.util.spec_from_file_location("make_readme", ROOT / "tools" / "make_readme.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
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
