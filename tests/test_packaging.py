"""What installing getam gives: the README's test command installs everything the full test set needs, and the one test
it cannot (the real browser) says how to get what it lacks. The wheel itself is tested by .ci/wheel-test (run in CI)."""
import re, tomllib
from pathlib import Path

import pytest

import test_widgets

ROOT = Path(__file__).resolve().parents[1]


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_readme_test_command_installs_what_the_tests_import():
    "`pip install -e \".[dev]\" && pytest -q`: the dev extra brings pytest, the dense CRF and the browser driver."
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"pytest", "pydensecrf2", "playwright", "ruff"} <= _names(extras["dev"])
    assert 'pip install -e ".[dev]" && pytest -q' in (ROOT / "README.md").read_text()


def test_cuda_marker_is_registered():
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("cuda:") for m in markers)


def test_browser_test_without_chromium_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(test_widgets, "CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(pytest.skip.Exception) as e:
        test_widgets.test_explorer_renders_in_jupyterlab_in_chromium(None, tmp_path)
    assert "apt-get install chromium" in str(e.value) and "no-chromium" in str(e.value)
