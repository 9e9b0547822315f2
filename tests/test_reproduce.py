"""getam.repro.reproduce: notebook discovery, tables, the shared classifier cache,
and one reproduce notebook through papermill."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from getam.faithfulness import pseudo_label_miou
from getam.repro import experiments as E, reproduce as R

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "nbs" / "reproduce"


def test_reproduce_notebooks_are_parameterized_papermill_notebooks():
    nbs = R.reproduce_notebooks(NB_DIR)
    keys = [p.stem.split("_")[0] for p in nbs]
    assert {"fig1", "fig2", "fig4", "fig6", "fig7", "fig10", "fig11",
            "table1", "table4", "table5", "table6", "supp1", "supp2"} <= set(keys)
    order = lambda k: (["fig", "table", "supp"].index(k.rstrip("0123456789")), int(k.lstrip("figtablesup")))
    assert keys == sorted(keys, key=order)   # paper order: figures, tables, supplementary
    for p in nbs:
        nb = json.loads(p.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3", p
        params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{p.name}: expected one cell tagged parameters"
        src = "".join(params[0]["source"])
        for name in ("dataset", "checkpoint", "out_dir"):
            assert f"{name} =" in src, f"{p.name}: parameter {name} missing"
        assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), f"{p.name}: outputs stored"


def test_only_selects_and_names_unknown_keys(tmp_path):
    for n in ["supp2_e", "fig10_b", "supp1_d", "fig2_a", "table1_c", "readme", "supplement"]:
        (tmp_path / f"{n}.ipynb").write_text("{}")
    assert [p.stem for p in R.reproduce_notebooks(tmp_path)] == ["fig2_a", "fig10_b", "table1_c", "supp1_d", "supp2_e"]
    assert [p.stem for p in R.reproduce_notebooks(tmp_path, "table1, fig10")] == ["fig10_b", "table1_c"]
    assert [p.stem for p in R.reproduce_notebooks(tmp_path, "supp2,fig2")] == ["fig2_a", "supp2_e"]
    with pytest.raises(ValueError, match="fig3"): R.reproduce_notebooks(tmp_path, "fig2,fig3")
    with pytest.raises(FileNotFoundError, match="reproduce notebooks"): R.reproduce_notebooks(tmp_path / "nope")


def test_cli_list(capsys):
    assert R.main(["--list", "--only", "fig2,table1"]) == 0
    assert capsys.readouterr().out.split() == ["fig2_cam_vit_vs_cnn.ipynb", "table1_cam_methods.ipynb"]
    assert R.main(["--list", "--only", "supp1,fig1,fig11"]) == 0
    assert (capsys.readouterr().out.split()
            == ["fig1_cam_vs_getam.ipynb", "fig11_qualitative.ipynb", "supp1_alpha.ipynb"])


def test_tables_are_written_as_markdown_and_csv(tmp_path):
    df = pd.DataFrame({"method": ["GETAM"], "ours": [27.349], "mIoU (reported by the paper)": [71.7]})
    md, csv = E.save_table(df, tmp_path, "table1_x", "cap")
    assert md.read_text() == ("cap\n\n"
                              "| method | ours | mIoU (reported by the paper) |\n"
                              "|---|---|---|\n"
                              "| GETAM | 27.3 | 71.7 |\n")
    pd.testing.assert_frame_equal(pd.read_csv(csv), df)


def test_oracle_maps_score_100_and_uniform_maps_do_not():
    """The shared label rule: maps equal to the ground truth give perfect pseudo labels;
    flat maps cannot separate two classes."""
    mask = torch.zeros(1, 16, 16, dtype=torch.long)
    mask[0, :, :8] = 1
    mask[0, :, 8:] = 2
    mask[0, :2] = 0
    x, lab, sal = torch.randn(1, 3, 16, 16), torch.tensor([[1., 1.]]), (mask > 0).long()
    oracle = lambda x, l: torch.stack([(mask == 1), (mask == 2)], 1).float()
    assert pseudo_label_miou(x, oracle, lab, sal, mask, 2, refine=False).miou == pytest.approx(100.0)
    flat = lambda x, l: torch.ones(1, 2, 4, 4)
    assert pseudo_label_miou(x, flat, lab, sal, mask, 2, refine=False).miou < 80


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
    m1 = E.classifier("vit", "synth", epochs=1, progress=False)
    p = E.checkpoint_path("vit", "synth")
    assert p.is_file() and p.parent == tmp_path / "runs" / "reproduce" / "checkpoints"
    info = E.classifier_info("vit", "synth")
    assert info["epochs"] == 1 and info["train_images"] == 8
    mtime = p.stat().st_mtime_ns
    m2 = E.classifier("vit", "synth", epochs=5, progress=False)      # cached: no retraining
    assert p.stat().st_mtime_ns == mtime
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()): assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        E.classifier("vit", "synth", checkpoint=tmp_path / "nope.safetensors")


def test_classifier_starts_from_the_shipped_vit_and_keeps_seeds_apart(tiny_synth, tmp_path):
    """The shared ViT fine-tunes getam's shipped weights (recorded);
    each seed and the from-scratch twin get their own file."""
    from getam.backbones import SHIPPED_WEIGHTS
    from safetensors.torch import load_file
    torch.set_num_threads(1)
    shipped = load_file(str(SHIPPED_WEIGHTS / "vit_tiny_patch16_224-p8-w64-d6-h2.safetensors"))
    fresh = E.vit_classifier(6)
    for k, v in shipped.items(): assert torch.equal(fresh.state_dict()[k], v), k       # 6 classes: the head is kept too
    E.classifier("vit", "synth", epochs=1, progress=False, seed=1)
    E.classifier("vit", "synth", epochs=1, progress=False, pretrained=False)
    names = sorted(p.name for p in (tmp_path / "runs" / "reproduce" / "checkpoints").glob("*.safetensors"))
    assert names == ["synth-vit-128px-s1.safetensors", "synth-vit-128px-scratch.safetensors"]
    info, scratch = E.classifier_info("vit", "synth", seed=1), E.classifier_info("vit", "synth", pretrained=False)
    assert (info["pretrained"] == "vit_tiny_patch16_224-p8-w64-d6-h2.safetensors" and info["seed"] == 1
            and info["lr"] == 3e-4)
    assert 0 <= info["val_f1_before"] <= 1 and scratch["pretrained"] is None and scratch["val_f1_before"] is None
    assert E.input_stats() == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))    # the shipped ViT's normalisation


def test_table4_and_table6_vit_rows_are_the_main_run(monkeypatch):
    """At the main run's backbone and budget a reduced run is the main run;
    another family gets its patch override and its own weights."""
    seen = []
    monkeypatch.setattr(E, "trained_run", lambda name, dataset="synth", *a, **kw: seen.append((name, kw)) or {})
    E.reduced_run("synth", None, E.REDUCED_EPOCHS)
    E.backbone_run("synth", E.BACKBONES["ViT"])
    assert [n for n, _ in seen] == ["synth-main", "synth-main"] and all(kw["pretrained"] for _, kw in seen)
    seen.clear()
    E.backbone_run("synth", E.BACKBONES["ViT-Hybrid"])
    (name, kw), = seen
    assert (name == "synth-vit_tiny_r_s16_p8_224-e20" and kw["patch_size"] == 2 and kw["layers"] == [3, 4, 5]
            and kw.get("pretrained", True))
    seen.clear()
    E.main_run("synth", pretrained=False)
    E.oracle_run("synth", pretrained=False)
    E.oracle_run("synth")
    assert [n for n, _ in seen] == ["synth-main-scratch", "synth-oracle-scratch", "synth-oracle"]
    assert [kw["pretrained"] for _, kw in seen] == [False, False, True] and seen[2][1]["cls_only_frac"] == 0.0


@pytest.mark.slow
def test_fig4_notebook_runs_through_papermill(tiny_synth, tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    ckpt = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in E.vit_classifier(6).state_dict().items()}, str(ckpt))
    before = sorted(p.name for p in NB_DIR.iterdir())
    df = R.run_reproduce("synth", only="fig4", out=tmp_path / "figures", checkpoint=str(ckpt),
                         runs_dir=tmp_path / "runs", progress=False, pretrain=False)
    assert list(df.notebook) == ["fig4_acls_vs_grad.ipynb"]
    assert df.status.tolist() == ["ok"], df.error.tolist()
    assert df.outputs.tolist() == ["fig4_acls_vs_grad.png"]
    png = tmp_path / "figures" / "fig4_acls_vs_grad.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # executed copy under runs/, not in nbs/
    assert (tmp_path / "runs" / "reproduce" / "fig4_acls_vs_grad.ipynb").is_file()
    assert sorted(p.name for p in NB_DIR.iterdir()) == before


@pytest.mark.slow
def test_supp4_notebook_writes_both_tables_quick(tiny_synth, tmp_path):
    "The explainers table and the pooled read-out, made by the reproduce run (quick: 8 images, one 1-epoch seed)."
    df = R.run_reproduce("synth", only="supp4", out=tmp_path / "figures", runs_dir=tmp_path / "runs", progress=False,
                         pretrain=False, threads=1, params=dict(quick=True))
    assert df.status.tolist() == ["ok"], df.error.tolist()
    assert df.outputs.iloc[0].split() == ["explainers.csv", "explainers.md", "pooled_readout.json", "pooled_readout.md"]
    text = (tmp_path / "figures" / "pooled_readout.md").read_text()
    assert "SynthVOC v2 val, 8 images" in text and "Decision: GETAM with the mean rows is" in text
    assert "| LeGrad (ours) |" in (tmp_path / "figures" / "explainers.md").read_text()


@pytest.mark.slow
def test_failing_notebook_is_reported_not_fatal(tiny_synth, tmp_path):
    nb_dir = tmp_path / "nbs"
    nb_dir.mkdir()
    cell = lambda src, tags=(): dict(cell_type="code", id=f"c{abs(hash(src)) % 10**8}", metadata=dict(tags=list(tags)),
                                     source=src, outputs=[], execution_count=None)
    nb = dict(nbformat=4, nbformat_minor=5,
              metadata=dict(kernelspec=dict(name="python3", display_name="Python 3", language="python")),
              cells=[cell("dataset = 'synth'\ncheckpoint = ''\nout_dir = '.'", ["parameters"]),
                     cell("raise ValueError('boom 42')")])
    (nb_dir / "fig99_broken.ipynb").write_text(json.dumps(nb))
    df = R.run_reproduce("synth", out=tmp_path / "figures", nb_dir=nb_dir, runs_dir=tmp_path / "runs",
                         progress=False, pretrain=False)
    assert df.status.tolist() == ["failed"] and "boom 42" in df.error.iloc[0]


# 2 steps per epoch on 8 images: the last one is phase 2
TINY_RUN = dict(epochs=2, batch_size=4, limit_val=4, plots=False)


def test_trained_run_is_trained_once_then_reused(tiny_synth, tmp_path):
    r1 = E.trained_run("tiny", progress=False, **TINY_RUN)
    out = tmp_path / "runs" / "reproduce" / "train" / "tiny"
    assert r1["trained"] and r1["out_dir"] == out and (out / "pseudo_labels").is_dir()
    assert r1["metrics"]["steps"] == 4 and r1["metrics"]["n_val"] == 4
    cfg = r1["cfg"]
    assert cfg.preset == "synth" and cfg.epochs == 2 and cfg.data_root == str(tiny_synth)
    from getam.train.singlestage import make_config
    # the recipe itself flows in (fine-tuning the shipped ViT), only the overrides change
    preset = make_config(preset="synth", pretrained=True)
    assert cfg.pretrained and ((cfg.lr, cfg.embed_dim, cfg.cls_only_frac)
                               == (preset.lr, preset.embed_dim, preset.cls_only_frac) == (1e-3, 64, 0.25))
    assert not r1["model"].training
    from safetensors.torch import load_file
    sd = load_file(str(out / "model.safetensors"))
    for k, v in r1["model"].state_dict().items(): assert torch.equal(v, sd[k]), k
    mtime = (out / "metrics.json").stat().st_mtime_ns
    r2 = E.trained_run("tiny", progress=True, **TINY_RUN)           # progress is display only: reused, not retrained
    assert not r2["trained"] and (out / "metrics.json").stat().st_mtime_ns == mtime
    for (k, a), b in zip(r1["model"].state_dict().items(), r2["model"].state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match=r"epochs: 2 -> 1"):
        E.trained_run("tiny", progress=False, retrain=False, **{**TINY_RUN, "epochs": 1})
    assert (out / "metrics.json").stat().st_mtime_ns == mtime     # the refusal left the cached run alone
    r3 = E.trained_run("tiny", progress=False, **{**TINY_RUN, "epochs": 1})
    assert r3["trained"] and r3["metrics"]["steps"] == 2 and r3["cfg"].epochs == 1
    with pytest.raises(ValueError, match="plain folder name"): E.trained_run("../tiny")


def test_load_run_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json"): E.load_run(tmp_path)


def test_run_names_keep_quick_runs_apart():
    assert E.run_name("synth", "main") == "synth-main"
    assert E.run_name("synth", "main", quick=True) == "synth-main-quick"
    assert set(E.QUICK) >= {"epochs", "limit_train"}


@pytest.fixture
def small_synth(tmp_path, monkeypatch):
    "32 train images: one full batch of the preset's 16 per step."
    from getam.synth import make_synthvoc
    root = make_synthvoc(tmp_path / "synth", n_train=32, n_val=8, size=64)
    monkeypatch.setenv("GETAM_SYNTH_ROOT", str(root))
    monkeypatch.setenv("GETAM_SYNTH_SALIENCY_ROOT", str(root / "SaliencyMaps"))
    monkeypatch.setenv("GETAM_RUNS_DIR", str(tmp_path / "runs"))
    return root


@pytest.mark.slow
def test_fig11_notebook_runs_quick_through_papermill(small_synth, tmp_path):
    "Fig. 11 with the QUICK budget: trains the main run and the COCO-format run once, draws both."
    df = R.run_reproduce("synth", only="fig11", out=tmp_path / "figures", runs_dir=tmp_path / "runs",
                         progress=False, pretrain=False, params=dict(quick=True, n_images=2, coco_images=1))
    assert df.status.tolist() == ["ok"], df.error.tolist()
    assert df.outputs.tolist() == ["fig11_qualitative.png"]
    png = tmp_path / "figures" / "fig11_qualitative.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    train = tmp_path / "runs" / "reproduce" / "train"
    assert sorted(p.name for p in train.iterdir()) == ["synth-main-quick", "synthcoco-vit_tiny_patch16_224-quick"]
    coco = json.loads((train / "synthcoco-vit_tiny_patch16_224-quick" / "metrics.json").read_text())
    assert (coco["dataset"] == "coco" and coco["n_train"] == 32
            and coco["config"]["data_root"] == str(small_synth) + "-coco")


def _params(nb: Path) -> dict:
    "The parameters cell of a notebook, executed."
    cell = next(c for c in json.loads(nb.read_text())["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    ns = {}
    exec("".join(cell["source"]), ns)
    return ns


def test_notebook_budgets_are_the_ones_trained_ahead():
    """train_shared trains the runs the notebooks will ask for only while their budget parameters equal the module's
    defaults."""
    p = {nb.stem.split("_")[0]: _params(nb) for nb in R.reproduce_notebooks(NB_DIR)}
    assert p["table4"]["epochs"] == p["table6"]["epochs"] == p["fig11"]["coco_epochs"] == E.REDUCED_EPOCHS
    t5 = p["table5"]
    assert dict(steps=t5["deeplab_steps"], backbone=t5["deeplab_backbone"], scales=t5["deeplab_scales"],
                crf=t5["crf"]) == E.DEEPLAB


def test_shared_jobs_of_the_reproduce_notebooks():
    B = E.BACKBONES
    jobs = R.shared_jobs(R.reproduce_notebooks(NB_DIR))
    # one job per model: the ViT row of Table 4 is the main run
    assert [(j.fn, j.kw.get("backbone") or j.kw.get("kind"), j.kw.get("pretrained", True), j.kw.get("seed", 0))
            for j in jobs] == [
        ("main_run", None, False, 0), ("deeplab_run", None, True, 0), ("backbone_run", B["ViT-Hybrid"], True, 0),
        ("oracle_run", None, False, 0), ("classifier", "cnn", True, 0), ("backbone_run", B["DeiT-Distilled"], True, 0),
        ("coco_run", None, True, 0), ("oracle_run", None, True, 0), ("classifier", "vit", False, 0),
        ("classifier", "vit", True, 0), ("classifier", "vit", True, 1), ("classifier", "vit", True, 2)]
    assert all(j.kw["dataset"] == "synth" for j in jobs)
    assert [j.fn for j in R.shared_jobs(R.reproduce_notebooks(NB_DIR, "fig4"))] == ["classifier"]
    assert R.shared_jobs(R.reproduce_notebooks(NB_DIR, "fig4"), checkpoint="vit.safetensors") == []
    fig11 = R.shared_jobs(R.reproduce_notebooks(NB_DIR, "fig11"), quick=True)
    assert [(j.fn, j.kw) for j in fig11] == [("main_run", dict(dataset="synth", quick=True)),
                                             ("coco_run", dict(dataset="synth", quick=True))]


def test_backbone_overrides_keep_the_token_size():
    assert E.backbone_overrides(E.BACKBONES["ViT"]) == {} and E.backbone_overrides(E.BACKBONES["DeiT-Distilled"]) == {}
    state = torch.random.get_rng_state()
    # stride-4 stem x 2 = 8 px, the synth ViT's patch; last 3 of 6 blocks
    assert E.backbone_overrides(E.BACKBONES["ViT-Hybrid"]) == dict(patch_size=2, layers=[3, 4, 5])
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.slow
def test_train_shared_trains_in_parallel_what_the_notebooks_then_load(tiny_synth, tmp_path):
    jobs = [R.SharedJob("a", "trained_run", dict(name="a", **TINY_RUN), 2),
            R.SharedJob("b", "trained_run", dict(name="b", **TINY_RUN, seed=1), 1),
            R.SharedJob("bad", "trained_run", dict(name="../bad"), 0)]
    rows = R.train_shared(jobs, workers=2, threads=1, progress=False)
    assert ([(r["notebook"], r["status"]) for r in rows]
            == [("(train) a", "ok"), ("(train) b", "ok"), ("(train) bad", "failed")])
    assert "plain folder name" in rows[2]["error"]
    a, b = E.trained_run("a", progress=False, **TINY_RUN), E.trained_run("b", progress=False, **TINY_RUN, seed=1)
    assert not a["trained"] and not b["trained"]                       # cached by the child processes
    # the same config here, one thread: the same weights
    ref = E.trained_run("ref", progress=False, **TINY_RUN)
    for k, v in ref["model"].state_dict().items(): assert torch.equal(v, a["model"].state_dict()[k]), k


@pytest.mark.slow
def test_an_interrupted_run_continues_from_its_checkpoint(tiny_synth, tmp_path, capsys):
    out = tmp_path / "runs" / "reproduce" / "train" / "cut"
    with pytest.raises(RuntimeError, match="stopped early"):
        E.trained_run("cut", progress=False, stop_at_step=2, **TINY_RUN)
    assert (out / "state.pt").is_file() and not (out / "metrics.json").is_file()
    first = pd.read_csv(out / "log.csv")
    assert first.step.tolist() == [0, 1]
    capsys.readouterr()
    r = E.trained_run("cut", progress=False, **TINY_RUN)
    assert "continuing the interrupted run from its checkpoint at step 2" in capsys.readouterr().out
    assert r["trained"] and r["metrics"]["steps"] == 4
    log = pd.read_csv(out / "log.csv")
    assert log.step.tolist() == [0, 1, 2, 3]
    # steps 0-1 kept from the first call (their times too), 2-3 resumed
    pd.testing.assert_frame_equal(log.iloc[:2], first)
    ref = E.trained_run("ref", progress=False, **TINY_RUN)
    for k, v in ref["model"].state_dict().items(): assert torch.equal(v, r["model"].state_dict()[k]), k
    pd.testing.assert_series_equal(log.loss, pd.read_csv(ref["out_dir"] / "log.csv").loss)


def test_needs_table_matches_the_notebooks_calls():
    "`NEEDS` (what each notebook trains ahead) equals what the notebooks' code cells actually call for."
    calls = {'classifier("vit"': "vit", 'classifier("cnn"': "cnn", "main_run(": "main", "oracle_run(": "oracle",
             "deeplab_run(": "deeplab", "backbone_run(": "backbones", "reduced_run(": "reduced", "coco_run(": "coco",
             "R.SEEDS": "vit-seeds", 'classifier("vit", dataset, pretrained=False': "vit-scratch",
             "main_run(dataset, pretrained=False": "main-scratch",
             "oracle_run(dataset, pretrained=False": "oracle-scratch"}
    for nb in R.reproduce_notebooks(NB_DIR):
        code = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        found = {key for call, key in calls.items() if call in code}
        assert found == set(R.NEEDS[nb.stem.split("_")[0]]), nb.name
