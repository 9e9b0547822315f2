"""Single-stage training: one double-backward step, single- vs two-forward gradients, exact resume,
DDP, AMP, bad parameters, the papermill job."""
import dataclasses, json, math, os, socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fixtures import record_qkv_dtypes, tiny_batch, tiny_config, tiny_model, toy_items
from getam.completion import LabelRule
from getam.data import eval_transform, load_dataset
from getam.repro.experiments import load_run
from getam.train.infer import evaluate_segmenter
from getam.train.losses import seg_loss
from getam.metrics import score_folder
from getam.train.schedules import lr_at
from getam.train.step import class_token_saliency, step_losses, two_forward_losses
from getam.train.singlestage import TrainConfig, arg_parser, make_config, train

ROOT = Path(__file__).resolve().parents[1]


def _check_reported_metrics(m: dict, run_dir: Path, val_ds, pseudo_gt=None):
    """What a run reports is what its files hold: `pseudo_miou` (and per-class IoU) is the score of the written
    pseudo-label PNGs against the ground truth `pseudo_gt` (a data set or a folder of masks), `val_miou` that of the
    saved checkpoint re-evaluated on `val_ds` (a data set, or a function of the loaded run). Exact: the same integer
    counts give the same float."""
    run = load_run(run_dir)
    if pseudo_gt is not None:
        K = run["model"].num_classes + 1
        cm = score_folder(run_dir / "pseudo_labels", pseudo_gt, num_classes=K, progress=False)
        assert cm.miou() == m["pseudo_miou"]
        assert [None if math.isnan(v) else v for v in cm.iou().tolist()] == list(m["pseudo_iou"].values())   # NaN: null
    val = val_ds(run) if callable(val_ds) else val_ds
    assert evaluate_segmenter(run["model"], val).miou() == m["val_miou"]


def test_double_backward_step_changes_weights_and_losses_finite():
    torch.manual_seed(0)
    model, batch = tiny_model(), tiny_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = step_losses(model, batch, phase=2)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    for k in ("loss", "cls_loss", "seg_loss"): assert torch.isfinite(out[k]), k
    changed = {k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])}
    assert {"backbone.blocks.0.attn.qkv.weight", "backbone.head.weight", "decoder.head.4.weight"} <= changed
    # the pseudo labels use 0 (background), classes present in the image and 255 only
    present = {0, 255} | {c + 1 for c in torch.nonzero(batch["label"][0]).flatten().tolist()}
    assert set(out["pseudo"][0].unique().tolist()) <= present


def _grads(fn, seed=0):
    torch.manual_seed(seed)
    m = tiny_model()
    m.decoder.head[3].p = 0.0  # dropout off
    out = fn(m, tiny_batch(b=3, seed=1))
    out["loss"].backward()
    return out, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


def test_single_forward_equals_two_forward_gradients():
    o1, g1 = _grads(lambda m, b: step_losses(m, b, phase=2))
    o2, g2 = _grads(two_forward_losses)
    assert torch.equal(o1["pseudo"], o2["pseudo"])
    assert set(g1) == set(g2) and len(g1) > 50
    # fused vs unfused attention: rounding only
    for k in g1: torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6, msg=k)
    # and the GETAM backward really left no parameter gradients behind: one backward = one set of gradients
    torch.manual_seed(0)
    m = tiny_model()
    m.decoder.head[3].p = 0.0
    step_losses(m, tiny_batch(b=3, seed=1), phase=2)
    assert all(p.grad is None for p in m.parameters())


def test_class_token_saliency_is_the_mean_class_row_through_attention_saliency():
    from getam.completion import attention_saliency
    g = torch.Generator().manual_seed(0)
    attn = [torch.rand(2, 2, 5, 5, generator=g) for _ in range(3)]  # 3 blocks, batch 2, 2 heads, [class] + 2x2 patches
    image = torch.randn(2, 3, 8, 8, generator=g)
    a_cls = sum(a[:, 0, 0, 1:] + a[:, 1, 0, 1:] for a in attn) / 6  # mean over heads and blocks of row 0, patch columns
    expected = attention_saliency(a_cls.view(2, 2, 2), image, 0.3)
    assert torch.equal(class_token_saliency(attn, (2, 2), 1, image, 0.3), expected)
    assert not torch.equal(class_token_saliency(attn, (2, 2), 1, image, 0.9), expected)  # the threshold is used


def test_attention_saliency_mode_reads_no_saliency_maps():
    torch.manual_seed(0)
    batch = tiny_batch()
    del batch["saliency"]
    out = step_losses(tiny_model(), batch, phase=2, rule=LabelRule(saliency="attention"))
    assert torch.isfinite(out["loss"]) and out["pseudo"].shape == (2, 32, 32)
    with pytest.raises(ValueError, match="needs saliency='maps'"):
        make_config(saliency="attention", saliency_weight=1.0)


def test_poly_schedule_and_phase2_scale():
    c = TrainConfig(lr=0.04, phase2_lr_scale=0.1, cls_only_frac=0.5)
    assert lr_at(0, 100, **c.schedule()) == pytest.approx(0.04)
    assert lr_at(49, 100, **c.schedule()) == pytest.approx(0.04 * 0.51 ** 0.9)
    assert lr_at(50, 100, **c.schedule()) == pytest.approx(0.004 * 0.5 ** 0.9)



def test_method_functions_run_without_a_training_config():
    """The step and inference take the label rule and their settings as arguments:
    getam.train.singlestage is never imported."""
    code = """
import sys, torch
from timm.models.vision_transformer import VisionTransformer
from getam.model import GetamSegmenter
from getam.completion import LabelRule
from getam.train.step import step_losses, two_forward_losses
from getam.train.infer import make_pseudo_labels, pseudo_label_dataset
torch.manual_seed(0)
vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3,
                        dynamic_img_size=True)
m = GetamSegmenter(vit, num_classes=3, features=16)
g = torch.Generator().manual_seed(0)
b = dict(image=torch.randn(2, 3, 32, 32, generator=g), label=torch.tensor([[1., 0, 1], [0, 1, 0]]),
         saliency=(torch.rand(2, 32, 32, generator=g) > 0.5).long())
out = step_losses(m, b, 2, rule=LabelRule(alpha=0.8), layers=[2, 3])
two = two_forward_losses(m, b, rule=LabelRule(alpha=0.8), layers=[2, 3])
assert torch.equal(out["pseudo"], two["pseudo"]) and torch.isfinite(out["loss"])
pl = make_pseudo_labels(m.eval(), b["image"], b["label"], rule=LabelRule(saliency="attention"))
mask = torch.zeros(32, 32, dtype=torch.long)
items = [dict(image=b["image"][i], label=b["label"][i], mask=mask, name=str(i)) for i in range(2)]
cm = pseudo_label_dataset(m, items, rule=LabelRule(saliency="attention"))
assert pl.shape == (2, 32, 32) and int(cm.mat.sum() + cm.missed.sum()) == 2 * 32 * 32
assert "getam.train.singlestage" not in sys.modules, sorted(k for k in sys.modules if k.startswith("getam"))
print("ok")
"""
    import subprocess, sys
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_label_rule_and_step_defaults_equal_train_config_defaults():
    import dataclasses, inspect
    from getam.train.infer import make_pseudo_labels, pseudo_label_dataset
    from getam.train.step import phase2_start
    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}
    cfg = TrainConfig()
    assert cfg.label_rule() == LabelRule()
    rule = dataclasses.asdict(LabelRule())
    assert set(rule) == {"gamma", "alpha", "use_pamr", "saliency", "attention_threshold"}
    assert rule == {k: getattr(cfg, k) for k in rule}
    assert cfg.step_settings() == {k: defaults(step_losses)[k] for k in cfg.step_settings()}
    assert cfg.schedule() == {k: defaults(lr_at)[k] for k in cfg.schedule()}
    assert defaults(phase2_start)["cls_only_frac"] == cfg.cls_only_frac
    for fn in (two_forward_losses, make_pseudo_labels, pseudo_label_dataset):
        shared = defaults(fn).keys() & cfg.step_settings().keys()
        assert {"rule", "layers", "fusion"} <= shared, fn
        assert {k: defaults(fn)[k] for k in shared} == {k: cfg.step_settings()[k] for k in shared}, fn
    # a non-default config hands its own values on
    c = make_config(preset="released", dataset="coco", saliency="attention", attention_threshold=0.4, layers=[1, 2])
    assert c.label_rule() == LabelRule(alpha=0.95, saliency="attention", attention_threshold=0.4)
    assert c.step_settings()["layers"] == [1, 2] and c.step_settings()["seg_loss"] == "split"

def test_seg_loss_ignores_255_and_split_averages_separately():
    seg = torch.zeros(1, 3, 1, 4)
    seg[0, 0, 0, 0] = 5.0  # pixel 0 confidently background
    t = torch.tensor([[[0, 1, 1, 255]]])
    ce = torch.nn.functional.cross_entropy(seg[..., :3], t[..., :3], reduction="none")[0, 0]
    assert seg_loss(seg, t).item() == pytest.approx(ce.mean().item())
    assert seg_loss(seg, t, "split").item() == pytest.approx(ce[0].item() + ce[1:].mean().item())


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    items, kw = toy_items(), dict(write_pseudo=False, dropout=0.2, drop_path=0.1)
    part = train(tiny_config(out_dir=str(tmp_path / "b"), stop_at_step=6, **kw), train_ds=items)
    assert part["stopped"] and len(part["log"]) == 6
    full = train(tiny_config(out_dir=str(tmp_path / "a"), **kw), train_ds=items)
    rest = train(tiny_config(out_dir=str(tmp_path / "b"), resume=True, **kw), train_ds=items)
    assert [r["loss"] for r in rest["log"]] == [r["loss"] for r in full["log"]]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    class Poisoned(torch.utils.data.Dataset):
        num_classes = 3
        def __init__(self, items, after): self.items, self.after, self.reads = items, after, 0
        def __len__(self): return len(self.items)
        def __getitem__(self, i):
            self.reads += 1
            it = dict(self.items[i])
            if self.reads > self.after: it["image"] = torch.full_like(it["image"], float("nan"))
            return it
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 4"):
        train(tiny_config(out_dir=str(tmp_path), write_pseudo=False), train_ds=Poisoned(toy_items(), after=16))
    st = torch.load(tmp_path / "state.pt", weights_only=True)
    assert (st["epoch"], st["step"]) == (1, 4)
    assert all(torch.isfinite(v).all()
               for v in load_file(tmp_path / "model.safetensors").values() if v.is_floating_point())


@pytest.mark.slow
def test_amp_bf16_on_cpu_runs(tmp_path, monkeypatch):
    """amp='bf16' really runs the forward in bfloat16 (the attention's qkv projection outputs bf16)
    and still gives finite losses."""
    dtypes = record_qkv_dtypes(monkeypatch)
    r = train(tiny_config(out_dir=str(tmp_path / "bf16"), amp="bf16", write_pseudo=False),
              train_ds=toy_items(8), val_ds=toy_items(2))
    assert len(r["log"]) == 4 and all(torch.isfinite(torch.tensor(row["loss"])) for row in r["log"])
    assert r["log"][-1]["phase"] == 2 and 0 <= r["metrics"]["val_miou"] <= 1
    assert dtypes and set(dtypes) == {torch.bfloat16}, dtypes
    _check_reported_metrics(r["metrics"], tmp_path / "bf16", toy_items(2))   # fp32 weights, evaluated outside autocast
    dtypes.clear()
    full = train(tiny_config(out_dir=str(tmp_path / "fp32"), write_pseudo=False), train_ds=toy_items(8))
    # amp changes the arithmetic
    assert set(dtypes) == {torch.float32} and full["log"][0]["loss"] != r["log"][0]["loss"]


@pytest.mark.parametrize("kw, msg", [
    (dict(dataset="cityscapes"), "dataset='cityscapes' is not valid; valid: voc, coco, synth"),
    (dict(amp="fp8"), "valid: none, bf16, fp16"),
    (dict(seg_loss="dice"), "valid: ce, split"),
    (dict(epochs=0), "epochs=0: expected a positive integer"),
    (dict(backbone="vit_gigantic"), "not a timm model"),
    (dict(epoch=3), "unknown parameter(s) ['epoch']"),
    (dict(preset="paper"), "valid: None, released, synth"),
])
def test_bad_parameters_fail_with_clear_messages(kw, msg):
    with pytest.raises(ValueError) as e: make_config(**kw)
    assert msg in str(e.value)


def test_cli_parses_config_fields():
    a = vars(arg_parser().parse_args(["--epochs", "3", "--no-augment", "--lr", "0.01", "--preset", "released"]))
    assert a == dict(epochs=3, augment=False, lr=0.01, preset="released")
    c = make_config(**a)
    assert (c.batch_size, c.crop_size, c.lr, c.epochs) == (4, 256, 0.01, 3)
    with pytest.raises(SystemExit): arg_parser().parse_args(["--no-such-flag", "1"])
    assert "high-activation quantile (Eq. 5); COCO 0.95 (default 0.9)" in " ".join(arg_parser().format_help().split())


def test_missing_data_names_path_and_settings_key(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        train(make_config(dataset="voc", data_root=str(tmp_path / "nowhere"), progress=False,
                          out_dir=str(tmp_path / "o")))
    assert "nowhere" in str(e.value) and "voc_root" in str(e.value)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, kw):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    r = train(tiny_config(out_dir=out, **kw), train_ds=toy_items())
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in r["model"].state_dict().items()}, f"{out}/rank{rank}.safetensors")


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    # global batch 4: 2 per rank; phase 1 then phase 2 (BN in the decoder)
    kw = dict(write_pseudo=False, batch_size=4, epochs=2)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), kw), nprocs=2, join=True)
    r0, r1 = load_file(tmp_path / "ddp" / "rank0.safetensors"), load_file(tmp_path / "ddp" / "rank1.safetensors")
    for k in r0: assert torch.equal(r0[k], r1[k]), k
    single = train(tiny_config(out_dir=str(tmp_path / "one"), threads=1, **kw),
                   train_ds=toy_items())["model"].state_dict()
    for k in r0:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    # and training did move the decoder (phase 2 ran under DDP)
    log = (tmp_path / "ddp" / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 8 and log[-1].split(",")[2] == "2"


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    from getam.synth import make_synthvoc
    d = tmp_path_factory.mktemp("synth")
    return (make_synthvoc(d / "voc", seed=0, n_train=8, n_val=4, size=64, progress=False),
            make_synthvoc(d / "coco", seed=0, n_train=8, n_val=4, size=64, fmt="coco", progress=False))


def _val_split(root: Path, dataset: str):
    "The val split of a run's data, normalised as the run normalised it (its backbone's statistics)."
    return lambda run: load_dataset(dataset, root, "val", transform=eval_transform(mean=run["mean"], std=run["std"]))


# a 4-block ViT: from scratch
TINY = dict(epochs=2, batch_size=4, crop_size=64, depth=4, threads=1, progress=False, pretrained=False)


@pytest.mark.slow
def test_papermill_runs_the_main_job(tiny_synth, tmp_path):
    import papermill as pm
    voc, _ = tiny_synth
    pm.execute_notebook(str(ROOT / "nbs" / "train.ipynb"), str(tmp_path / "out.ipynb"),
                        kernel_name="python3", cwd=str(ROOT),
                        parameters=dict(data_root=str(voc), out_dir=str(tmp_path / "run"), **TINY), progress_bar=False)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"dataset", "backbone", "epochs", "pseudo_miou", "val_miou", "wall_time_s"} <= set(m)
    assert m["dataset"] == "synth" and m["epochs"] == 2 and 0 <= m["pseudo_miou"] <= 1 and 0 <= m["val_miou"] <= 1
    assert (len(list((tmp_path / "run" / "pseudo_labels").glob("*.png"))) == 8
            and (tmp_path / "run" / "curves.png").is_file())
    _check_reported_metrics(m, tmp_path / "run", _val_split(voc, "synth"), voc / "SegmentationClassAug")
    with pytest.raises(pm.PapermillExecutionError, match="valid: voc, coco, synth"):
        pm.execute_notebook(str(ROOT / "nbs" / "train.ipynb"), str(tmp_path / "bad.ipynb"),
                            kernel_name="python3", cwd=str(ROOT),
                            parameters=dict(dataset="pascal"), progress_bar=False)


@pytest.mark.slow
def test_coco_format_end_to_end(tiny_synth, tmp_path):
    _, coco = tiny_synth
    r = train(make_config(dataset="coco", data_root=str(coco), out_dir=str(tmp_path / "run"), **TINY))
    m = r["metrics"]
    assert m["dataset"] == "coco" and m["n_train"] == 8 and m["n_val"] == 4 and 0 <= m["val_miou"] <= 1
    assert len(list((tmp_path / "run" / "pseudo_labels").glob("*.png"))) == 8
    _check_reported_metrics(m, tmp_path / "run", _val_split(coco, "coco"), load_dataset("coco", coco, "train"))


@pytest.mark.slow
def test_attention_saliency_end_to_end_without_saliency_maps(tiny_synth, tmp_path):
    voc, _ = tiny_synth
    r = train(make_config(data_root=str(voc), saliency="attention", saliency_root=str(tmp_path / "no-such-dir"),
                          out_dir=str(tmp_path / "run"), **TINY))
    assert 0 <= r["metrics"]["pseudo_miou"] <= 1 and len(list((tmp_path / "run" / "pseudo_labels").glob("*.png"))) == 8
    _check_reported_metrics(r["metrics"], tmp_path / "run", _val_split(voc, "synth"), voc / "SegmentationClassAug")


def _notebook_parameters() -> dict:
    "The parameters cell of nbs/train.ipynb as a dict of its literal values."
    import ast
    nb = json.loads((ROOT / "nbs" / "train.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body}


def test_train_notebook_documents_the_synth_preset():
    """Every value of the synth preset is shown in brackets in the parameters cell of nbs/train.ipynb."""
    import ast, re
    from getam.train.singlestage import PRESETS
    nb = json.loads((ROOT / "nbs" / "train.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    shown = {m[1]: m[2] for m in re.finditer(r"^(\w+) = None\s+#.*\[([^\]]+)\]$", "".join(cell["source"]), re.M)}
    preset = PRESETS["synth"]
    assert set(shown) == set(preset)
    for k, v in shown.items():
        assert (v if isinstance(preset[k], str) else ast.literal_eval(v)) == preset[k], k


def test_command_line_and_notebook_share_their_defaults():
    """`python -m getam.train` (and torchrun, which runs the same main) with no option builds exactly the configuration
    of `papermill nbs/train.ipynb` with no parameter: the same preset, weights, schedule and benchmark version."""
    from getam.train.singlestage import DEFAULT_PRESET, cli_config, make_config
    nb = _notebook_parameters()
    assert nb.pop("preset") == DEFAULT_PRESET == "synth"
    assert set(nb) <= {f.name for f in dataclasses.fields(TrainConfig)}, "a notebook parameter TrainConfig lacks"
    cli, notebook = cli_config([]), make_config(preset=DEFAULT_PRESET, **nb)
    assert dataclasses.asdict(cli) == dataclasses.asdict(notebook)
    assert (cli.pretrained, cli.patch_size, cli.synth_version, cli.epochs) == (True, 8, 2, 20)
    # and an option moves both the same way: the from-scratch schedule follows --no-pretrained
    scratch = cli_config(["--no-pretrained"])
    from_notebook = make_config(preset=DEFAULT_PRESET, **{**nb, "pretrained": False})
    assert dataclasses.asdict(scratch) == dataclasses.asdict(from_notebook)
    assert (scratch.epochs, scratch.cls_only_frac) == (80, 0.75)


@pytest.mark.slow
def test_dataloader_workers_give_the_same_run(tiny_synth, tmp_path):
    "Augmentation is seeded per (seed, epoch, item), so decoding in a worker process changes nothing."
    voc, _ = tiny_synth
    kw = dict(data_root=str(voc), write_pseudo=False, plots=False, **TINY)
    w0 = train(make_config(out_dir=str(tmp_path / "w0"), num_workers=0, **kw))["model"].state_dict()
    w1 = train(make_config(out_dir=str(tmp_path / "w1"), num_workers=1, **kw))["model"].state_dict()
    for k in w0: assert torch.equal(w0[k], w1[k]), k
