"""getam.reproduce: notebook discovery, tables, the shared classifier cache, and one reproduce notebook through papermill."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from getam import reproduce as R

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "nbs" / "reproduce"


def test_reproduce_notebooks_are_parameterized_papermill_notebooks():
    nbs = R.reproduce_notebooks(NB_DIR)
    keys = [p.stem.split("_")[0] for p in nbs]
    assert {"fig2", "fig4", "fig6", "fig7", "fig10", "table1"} <= set(keys)
    assert keys == sorted(keys, key=lambda k: (k.startswith("table"), int(k.lstrip("figtable"))))   # paper order, figures first
    for p in nbs:
        nb = json.loads(p.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3", p
        params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{p.name}: expected one cell tagged parameters"
        src = "".join(params[0]["source"])
        for name in ("dataset", "checkpoint", "out_dir"): assert f"{name} =" in src, f"{p.name}: parameter {name} missing"
        assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), f"{p.name}: outputs stored"


def test_only_selects_and_names_unknown_keys(tmp_path):
    for n in ["fig10_b", "fig2_a", "table1_c", "readme"]: (tmp_path / f"{n}.ipynb").write_text("{}")
    assert [p.stem for p in R.reproduce_notebooks(tmp_path)] == ["fig2_a", "fig10_b", "table1_c"]
    assert [p.stem for p in R.reproduce_notebooks(tmp_path, "table1, fig10")] == ["fig10_b", "table1_c"]
    with pytest.raises(ValueError, match="fig3"): R.reproduce_notebooks(tmp_path, "fig2,fig3")
    with pytest.raises(FileNotFoundError, match="reproduce notebooks"): R.reproduce_notebooks(tmp_path / "nope")


def test_cli_list(capsys):
    assert R.main(["--list", "--only", "fig2,table1"]) == 0
    assert capsys.readouterr().out.split() == ["fig2_cam_vit_vs_cnn.ipynb", "table1_cam_methods.ipynb"]


def test_tables_are_written_as_markdown_and_csv(tmp_path):
    df = pd.DataFrame({"method": ["GETAM"], "ours": [27.349], "mIoU (reported by the paper)": [71.7]})
    md, csv = R.save_table(df, tmp_path, "table1_x", "cap")
    assert md.read_text() == "cap\n\n| method | ours | mIoU (reported by the paper) |\n|---|---|---|\n| GETAM | 27.3 | 71.7 |\n"
    pd.testing.assert_frame_equal(pd.read_csv(csv), df)


def test_oracle_maps_score_100_and_uniform_maps_do_not():
    "The shared label rule: maps equal to the ground truth give perfect pseudo labels; flat maps cannot separate two classes."
    mask = torch.zeros(1, 16, 16, dtype=torch.long); mask[0, :, :8] = 1; mask[0, :, 8:] = 2; mask[0, :2] = 0
    x, lab, sal = torch.randn(1, 3, 16, 16), torch.tensor([[1., 1.]]), (mask > 0).long()
    oracle = lambda x, l: torch.stack([(mask == 1), (mask == 2)], 1).float()
    assert R.pseudo_label_miou(oracle, x, lab, mask, sal, 2, refine=False)[0] == pytest.approx(100.0)
    flat = lambda x, l: torch.ones(1, 2, 4, 4)
    assert R.pseudo_label_miou(flat, x, lab, mask, sal, 2, refine=False)[0] < 80


@pytest.fixture
def tiny_synth(tmp_path, monkeypatch):
    from getam.synth import make_synthvoc
    root = make_synthvoc(tmp_path / "synth", n_train=8, n_val=8, size=64)
    monkeypatch.setenv("GETAM_SYNTH_ROOT", str(root))
    monkeypatch.setenv("GETAM_SYNTH_SALIENCY_ROOT", str(root / "SaliencyMaps"))
    monkeypatch.setenv("GETAM_RUNS_DIR", str(tmp_path / "runs"))
    return root


def test_classifier_is_trained_once_then_loaded(tiny_synth, tmp_path):
    torch.set_num_threads(1)
    m1 = R.classifier("vit", "synth", epochs=1, progress=False)
    p = R.checkpoint_path("vit", "synth")
    assert p.is_file() and p.parent == tmp_path / "runs" / "reproduce" / "checkpoints"
    info = R.classifier_info("vit", "synth")
    assert info["epochs"] == 1 and info["train_images"] == 8
    mtime = p.stat().st_mtime_ns
    m2 = R.classifier("vit", "synth", epochs=5, progress=False)      # cached: no retraining
    assert p.stat().st_mtime_ns == mtime
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()): assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="nope.safetensors"): R.classifier("vit", "synth", checkpoint=tmp_path / "nope.safetensors")


@pytest.mark.slow
def test_fig4_notebook_runs_through_papermill(tiny_synth, tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    ckpt = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in R.vit_classifier(6).state_dict().items()}, str(ckpt))
    before = sorted(p.name for p in NB_DIR.iterdir())
    df = R.run_reproduce("synth", only="fig4", out=tmp_path / "figures", checkpoint=str(ckpt), runs_dir=tmp_path / "runs",
                         progress=False, pretrain=False)
    assert list(df.notebook) == ["fig4_acls_vs_grad.ipynb"]
    assert df.status.tolist() == ["ok"], df.error.tolist()
    assert df.outputs.tolist() == ["fig4_acls_vs_grad.png"]
    png = tmp_path / "figures" / "fig4_acls_vs_grad.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (tmp_path / "runs" / "reproduce" / "fig4_acls_vs_grad.ipynb").is_file()   # executed copy under runs/, not in nbs/
    assert sorted(p.name for p in NB_DIR.iterdir()) == before


@pytest.mark.slow
def test_failing_notebook_is_reported_not_fatal(tiny_synth, tmp_path):
    nb_dir = tmp_path / "nbs"; nb_dir.mkdir()
    cell = lambda src, tags=(): dict(cell_type="code", id=f"c{abs(hash(src)) % 10**8}", metadata=dict(tags=list(tags)), source=src, outputs=[], execution_count=None)
    nb = dict(nbformat=4, nbformat_minor=5, metadata=dict(kernelspec=dict(name="python3", display_name="Python 3", language="python")),
              cells=[cell("dataset = 'synth'\ncheckpoint = ''\nout_dir = '.'", ["parameters"]), cell("raise ValueError('boom 42')")])
    (nb_dir / "fig99_broken.ipynb").write_text(json.dumps(nb))
    df = R.run_reproduce("synth", out=tmp_path / "figures", nb_dir=nb_dir, runs_dir=tmp_path / "runs", progress=False, pretrain=False)
    assert df.status.tolist() == ["failed"] and "boom 42" in df.error.iloc[0]
