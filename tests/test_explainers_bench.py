"Tests of getam.repro.explainers_bench: the peers are optional, the table is written, a smoke run end to end."
import csv
import subprocess
import sys

import pytest

from getam.repro.explainers_bench import COLUMNS, write_table


def test_peers_never_imported_with_getam():
    code = ("import sys, getam.repro.explainers_bench, getam.explain, getam.faithfulness; "
            "print(any(m in sys.modules for m in ('pytorch_grad_cam', 'torchcam')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_write_table(tmp_path, capsys):
    rows = [dict({c: 0.5 for c in COLUMNS}, method="A", note=""),
            dict({c: "n/a" for c in COLUMNS}, method="B", note="why")]
    md, path = write_table(rows, tmp_path, "t", "caption")
    text = md.read_text()
    assert text.startswith("caption\n\n| method |") and "| A | 0.500 |" in text and "| B | n/a |" in text
    assert list(csv.DictReader(open(path)))[1]["note"] == "why"
    assert "caption" in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_smoke(tmp_path, monkeypatch):
    from getam.repro.explainers_bench import benchmark
    from getam.synth import make_synthvoc
    monkeypatch.setenv("GETAM_RUNS_DIR", str(tmp_path / "runs"))
    make_synthvoc(tmp_path / "synth", n_train=8, n_val=4, size=64)
    rows = benchmark(root=tmp_path / "synth", size=64, n_images=4, batch_size=2, steps=2, out=tmp_path / "fig")
    assert [r["method"] for r in rows][:3] == ["GETAM", "Att-Gradients", "Grad-CAM (ours)"]
    assert (tmp_path / "fig" / "explainers.md").is_file() and (tmp_path / "fig" / "explainers.csv").is_file()
    assert 0 <= rows[0]["deletion AUC ↓"] <= 1 and rows[0]["s total"] > 0
