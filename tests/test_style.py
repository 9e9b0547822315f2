"""Reading standards (STYLE.md, "Density"): no line over 120 characters and no `;`-joined statements in the package,
the tests and the tools, checked with ruff's E501 and E702. One line is exempt: the `__all__ = [...]` line that nbdev
writes, which it wraps at 120 characters before it adds the 10 of `__all__ = ` (nbdev 3.3, `ModuleMaker.make`)."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["getam", "tests", "tools"]


def violations(paths=PATHS, root=ROOT) -> list[str]:
    "`path:line: code message` for each E501/E702 finding, nbdev's `__all__` line aside."
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    out = subprocess.run([ruff, "check", "--select", "E501,E702", "--line-length", "120", "--output-format", "json",
                          "--exclude", "_modidx.py", "--no-cache", *paths], capture_output=True, text=True, cwd=root)
    found = []
    for v in json.loads(out.stdout or "[]"):
        path = Path(v["filename"])
        line = path.read_text().splitlines()[v["location"]["row"] - 1]
        if v["code"] == "E501" and line.startswith("__all__ = "): continue
        found.append(f"{path.relative_to(root)}:{v['location']['row']}: {v['code']} {v['message']}")
    return found


def test_no_long_lines_and_no_semicolon_joins():
    found = violations()
    assert not found, f"{len(found)} lines to split:\n" + "\n".join(found[:40])


def test_the_check_can_fail(tmp_path):
    (tmp_path / "bad.py").write_text("a = 1; b = 2\n"
                                     + "x = '" + "y" * 130 + "'\n"
                                     + "__all__ = ['" + "z" * 120 + "']\n")
    found = violations(["bad.py"], tmp_path)
    assert [f.split(": ", 1)[1].split()[0] for f in found] == ["E702", "E501"], found
