"""Tests of getam.train.evaluate: the confusion matrix, multi-scale+flip inference, dense CRF, pseudo-label scoring,
export, CLI."""
import builtins
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from getam.crf import _edge_example, crf_batch, dense_crf
from getam.data import load_dataset
from getam.repro.scale import write_coco_standin
from getam.train.evaluate import cached_masks, main
from getam.train.infer import SCALES, evaluate_model, export_voc_test, predict, voc_results_dir
from getam.metrics import ConfusionMatrix, iou_table, metrics, plot_iou, score_folder, score_pseudo_labels

try:
    import pydensecrf.densecrf  # noqa: F401
    HAS_CRF = True
except ImportError:
    HAS_CRF = False
needs_crf = pytest.mark.skipif(not HAS_CRF, reason="pydensecrf2 not installed (pip install pydensecrf2)")


# ---------------------------------------------------------------- confusion matrix, hand-computed
def test_hand_computed_ignore_absent_and_false_positive_class():
    # 4 classes. gt 255 pixels are dropped; class 2 is absent from gt and prediction (nan);
    # class 3 is predicted once but absent from gt (IoU 0, counts in the mean).
    gt = torch.tensor([[0, 0, 0, 1], [1, 1, 255, 255]])
    pred = torch.tensor([[0, 0, 3, 1], [1, 0, 2, 1]])
    cm = ConfusionMatrix(4).update(pred, gt)
    assert cm.mat.tolist() == [[2, 0, 0, 1], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    iou = cm.iou()
    # class 0: tp 2, gt 3, pred 3 -> 2/4; class 1: tp 2, gt 3, pred 2 -> 2/3; class 3: 0/1
    assert iou[0].item() == pytest.approx(0.5)
    assert iou[1].item() == pytest.approx(2 / 3)
    assert math.isnan(iou[2].item())
    assert iou[3].item() == 0.0
    assert cm.miou() == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)


def test_global_matrix_not_mean_of_images():
    # image A: perfect on class 1 (big); image B: class 1 fully missed (small). Global IoU_1 = 8/(8+2).
    cm = ConfusionMatrix(2)
    cm.update(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    cm.update(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    assert cm.iou()[1].item() == pytest.approx(8 / 10)
    assert cm.iou()[0].item() == 0.0  # background predicted twice, never right


def test_matches_naive_reference_over_batches():
    g = torch.Generator().manual_seed(0)
    K = 5
    cm = ConfusionMatrix(K)
    ref = np.zeros((K, K), np.int64)
    for _ in range(3):
        gt = torch.randint(0, K, (2, 7, 9), generator=g)
        gt[torch.rand(gt.shape, generator=g) < 0.2] = 255
        pred = torch.randint(0, K, (2, 7, 9), generator=g)
        cm.update(pred, gt)
        for p, t in zip(pred.flatten().tolist(), gt.flatten().tolist()):
            if t != 255:
                ref[t, p] += 1
    assert cm.mat.numpy().tolist() == ref.tolist()
    tp, union = np.diag(ref), ref.sum(0) + ref.sum(1) - np.diag(ref)
    assert cm.miou() == pytest.approx(float(np.nanmean(np.where(union > 0, tp / np.maximum(union, 1), np.nan))))


def test_inputs_numpy_pil_and_merge():
    gt = np.array([[0, 1], [1, 255]], np.uint8)
    a = ConfusionMatrix(2).update(Image.fromarray(gt), gt)
    b = ConfusionMatrix(2).update(torch.from_numpy(gt).long(), torch.from_numpy(gt).long())
    assert a.mat.tolist() == b.mat.tolist() == [[1, 0], [0, 2]]
    assert a.merge(b).mat.sum().item() == 6
    assert a.all_reduce() is a  # no process group: no-op


def test_pred_ignore_modes():
    gt, pred = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 255, 0, 255])
    miss = ConfusionMatrix(2).update(pred, gt).iou().tolist()
    bg = ConfusionMatrix(2, pred_ignore="background").update(pred, gt).iou().tolist()
    skip = ConfusionMatrix(2, pred_ignore="skip").update(pred, gt).iou().tolist()
    assert miss == pytest.approx([1 / 2, 1 / 2])   # each class loses one pixel to "ignore"
    assert bg == pytest.approx([2 / 3, 1 / 2])     # the 255 on gt-1 becomes a background false positive
    assert skip == pytest.approx([1.0, 1.0])


def test_bad_input_names_file_and_values():
    with pytest.raises(ValueError, match=r"2007_000033.*\(3, 4\).*\(4, 3\)"):
        ConfusionMatrix(3).update(torch.zeros(3, 4), torch.zeros(4, 3), name="2007_000033")
    with pytest.raises(ValueError, match=r"ground truth \(x.png\) has label values \[3, 21\]"
                                         r".*values seen: \[0, 3, 21, 255\]"):
        ConfusionMatrix(3).update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 3, 21, 255]), name="x.png")
    with pytest.raises(ValueError, match=r"prediction \(y\) has label values \[-1\]"):
        ConfusionMatrix(3).update(torch.tensor([0, -1]), torch.tensor([0, 1]), name="y")
    with pytest.raises(ValueError, match="class_names"):
        ConfusionMatrix(3, class_names=["a", "b"])


def test_iou_table_and_plot_have_class_names():
    import matplotlib
    matplotlib.use("Agg")
    cm = (ConfusionMatrix(3, class_names=["background", "cat", "dog"])
          .update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])))
    tab = iou_table(cm)
    assert list(tab.index) == ["background", "cat", "dog", "mIoU"]
    assert tab.loc["cat", "IoU"] == pytest.approx(50.0) and tab.loc["dog", "IoU"] == pytest.approx(50.0)
    assert tab.loc["mIoU", "IoU"] == pytest.approx(200 / 3)
    ax = plot_iou(cm)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["background", "cat", "dog"]
    m = metrics(cm)["score"]
    assert m["iou"] == {"background": 100.0, "cat": 50.0, "dog": 50.0} and m["miou"] == pytest.approx(66.67)


# ---------------------------------------------------------------- inference
def _sym_blur():
    k = torch.tensor([1., 2., 1.])
    return (k[:, None] * k[None])[None, None].repeat(3, 1, 1, 1) / 16


def test_flip_equivariant_model_ms_flip_equals_single_scale():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 1, 1)
    blur = _sym_blur()
    model = lambda x: F.conv2d(F.conv2d(x, blur, padding=1, groups=3), w)   # left-right symmetric kernels
    img = torch.randn(2, 3, 10, 14)
    assert torch.allclose(predict(model, img, flip=True), model(img), atol=1e-5)
    # a flip-equivariant *and* scale-invariant model (global average) on a flat image: every scale agrees
    gmodel = lambda x: F.conv2d(x.mean((2, 3), keepdim=True), w).expand(-1, -1, *x.shape[-2:])
    flat = torch.randn(2, 3, 1, 1).expand(-1, -1, 10, 14).contiguous()
    for scales in (SCALES["common"], SCALES["released"]):
        assert torch.allclose(predict(gmodel, flat, scales, flip=True), gmodel(flat), atol=1e-5)


def test_multiscale_matches_naive_reference():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    model = lambda x: conv(x)[..., ::2, ::2]   # output at half resolution: predict must upsample
    img = torch.randn(1, 3, 12, 16)
    scales = (0.5, 1.0, 24)
    outs = []
    for s in scales:
        size = (24, 24) if s == 24 else (round(12 * s), round(16 * s))
        x = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True):
            xi = x.flip(-1) if flip else x
            o = F.interpolate(model(xi), size=(12, 16), mode="bilinear", align_corners=False)
            outs.append(o.flip(-1) if flip else o)
    with torch.no_grad():
        ref = torch.stack(outs).mean(0)
        got = predict(model, img, scales, flip=True)
        assert torch.allclose(got, ref, atol=1e-5)
        ref_p = torch.stack([o.softmax(1) for o in outs]).mean(0)
        assert torch.allclose(predict(model, img, scales, flip=True, merge="probs"), ref_p, atol=1e-6)


def test_released_scales_are_square_sizes_and_flip_in_one_batch():
    seen = []
    def model(x):
        seen.append(tuple(x.shape))
        return torch.zeros(x.shape[0], 2, 4, 4)
    predict(model, torch.zeros(1, 3, 30, 50), "released", flip=True)
    assert seen == [(2, 3, 256, 256), (2, 3, 320, 320), (2, 3, 480, 480)]
    with pytest.raises(ValueError, match="expected logits"):
        predict(lambda x: torch.zeros(3, 2, 4, 4), torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------- dense CRF
@needs_crf
def test_crf_moves_blurred_boundary_to_the_image_edge():
    image, probs = _edge_example(H=16, W=24, edge=12, shift=4)
    before = probs.argmax(0)
    assert (before[:, 12:16] == 0).all()          # the blurred map is wrong on 4 columns
    for setting in ("released", "deeplab"):
        after = dense_crf(image, probs, setting).argmax(0)
        assert (after[:, :12] == 0).all() and (after[:, 12:] == 1).all(), setting
    # a map without an image edge stays where it is: the CRF follows the image, not a smoothing prior
    flat = np.full_like(image, 120)
    assert (dense_crf(flat, probs, "released").argmax(0)[:, 12:15] == 0).all()


@needs_crf
def test_crf_parallel_equals_serial_and_accepts_chw_tensors():
    image, probs = _edge_example()
    serial = crf_batch([image] * 3, [probs] * 3, "released", processes=1)
    parallel = crf_batch([torch.from_numpy(image).permute(2, 0, 1)] * 3, [torch.from_numpy(probs)] * 3,
                         "released", processes=2)
    for a, b in zip(serial, parallel):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_crf_missing_gives_install_message(monkeypatch):
    real = builtins.__import__
    def fake(name, *a, **k):
        if name.startswith("pydensecrf"):
            raise ImportError("no pydensecrf")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    image, probs = _edge_example()
    with pytest.raises(ImportError, match="pip install pydensecrf2"):
        dense_crf(image, probs)


# ---------------------------------------------------------------- evaluate_model, pseudo labels, export
def _toy(n=3, H=20, W=28):
    items = []
    for i in range(n):
        image = torch.zeros(3, H, W, dtype=torch.uint8)
        image[0, :, : W // 2] = 220
        image[2, :, W // 2:] = 220
        mask = torch.zeros(H, W, dtype=torch.long)
        mask[:, W // 2:] = 1
        mask[:2] = 255
        items.append(dict(image=image, mask=mask, name=f"toy{i}"))
    return items


def colour_model(x):
    return torch.stack([x[:, 0] - x[:, 2], x[:, 2] - x[:, 0]], 1) * 4


def test_evaluate_model_reports_every_protocol():
    toy = _toy()
    cms = evaluate_model(colour_model, toy, num_classes=2, crf=None, progress=False)
    assert list(cms) == ["single_scale", "ms_flip"]
    assert cms["single_scale"].miou() == 1.0
    assert cms["ms_flip"].mat.sum().item() == 3 * 18 * 28
    with pytest.raises(ValueError, match="num_classes=3"):
        evaluate_model(colour_model, toy, num_classes=3, crf=None, progress=False)


@needs_crf
def test_evaluate_model_with_crf_parallel_equals_serial():
    toy = _toy()
    a = evaluate_model(colour_model, toy, num_classes=2, crf="released", processes=1, progress=False)
    b = evaluate_model(colour_model, toy, num_classes=2, crf="released", processes=2, progress=False)
    assert list(a) == ["single_scale", "ms_flip", "ms_flip_crf"]
    assert a["ms_flip_crf"].mat.tolist() == b["ms_flip_crf"].mat.tolist()
    assert a["ms_flip_crf"].miou() == 1.0


def _spoil(item):
    pl = item["mask"].clone()
    pl[5:, 10:14] = 255
    pl[:5, :3] = 1
    return pl


def test_score_folder_equals_score_pseudo_labels(tmp_path):
    from getam.images import write_palette_png, write_png
    toy = _toy()
    for it in toy[:2]:
        write_palette_png(tmp_path / f"{it['name']}.png", _spoil(it).numpy())
    write_png(tmp_path / "toy2.png", _spoil(toy[2]).numpy().astype(np.uint8))  # single-channel PNG works too
    a = score_folder(tmp_path, toy, class_names=["background", "blue"], progress=False)
    b = score_pseudo_labels(_spoil, toy, class_names=["background", "blue"], progress=False)
    assert a.mat.tolist() == b.mat.tolist() and a.missed.tolist() == b.missed.tolist()
    # per image 252 background gt pixels: 9 predicted as 1, 60 ignored (misses)
    assert a.mat[0].tolist() == [3 * 183, 3 * 9] and a.missed.tolist() == [180, 0]
    with pytest.raises(FileNotFoundError, match="toy3.png"):
        score_folder(tmp_path, _toy(4), class_names=["background", "blue"], progress=False)
    write_png(tmp_path / "rgb" / "toy0.png", np.zeros((20, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="RGB"):
        score_folder(tmp_path / "rgb", toy[:1], class_names=["background", "blue"], progress=False)
    bad = tmp_path / "bad"
    write_palette_png(bad / "toy0.png", np.full((20, 28), 7, np.uint8))
    with pytest.raises(ValueError, match=r"bad/toy0.png.*\[7\]"):
        score_folder(bad, toy[:1], class_names=["background", "blue"], progress=False)


def test_voc_test_export_layout(tmp_path):
    items = [{k: v for k, v in it.items() if k != "mask"} for it in _toy(2)]
    d = export_voc_test(colour_model, items, tmp_path, num_classes=2, crf=None, progress=False)
    assert d == voc_results_dir(tmp_path) == tmp_path / "results/VOC2012/Segmentation/comp6_test_cls"
    assert sorted(p.name for p in d.iterdir()) == ["toy0.png", "toy1.png"]
    im = Image.open(d / "toy0.png")
    assert im.mode == "P" and im.size == (28, 20)
    assert np.asarray(im)[10].tolist() == [0] * 14 + [1] * 14
    assert im.getpalette()[3:6] == [128, 0, 0]   # VOC colour of class 1
    with pytest.raises(ValueError, match="comp5"):
        voc_results_dir(tmp_path, "comp4")


# ---------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    from getam.synth import make_synthvoc
    return make_synthvoc(tmp_path_factory.mktemp("synth") / "synth", seed=0, n_train=4, n_val=3, size=48)


def test_cli_scores_a_folder_of_pngs(tiny_synth, tmp_path):
    out = tmp_path / "m.json"
    res = main(["--dataset", "synth", "--data-root", str(tiny_synth), "--split", "val",
                "--pred-dir", str(tiny_synth / "SegmentationClassAug"), "--out", str(out)])
    assert res["labels"]["miou"] == 100.0
    assert json.loads(out.read_text())["labels"]["miou"] == 100.0


def test_cli_evaluates_a_deeplab_checkpoint(tiny_synth, tmp_path):
    from getam.deeplab import DeepLabV2, save_deeplab
    torch.manual_seed(0)
    ck = save_deeplab(DeepLabV2(7, "resnet18"), tmp_path / "run", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    res = main(["--dataset", "synth", "--data-root", str(tiny_synth), "--split", "val", "--checkpoint", str(ck),
                "--scales", "0.5 1", "--crf", "none", "--device", "cpu", "--save-dir", str(tmp_path / "pred"),
                "--out", str(tmp_path / "m.json")])
    assert set(res) >= {"single_scale", "ms_flip"} and 0 <= res["ms_flip"]["miou"] <= 100
    assert len(list((tmp_path / "pred").glob("*.png"))) == 3
    # the saved predictions score exactly like the ms_flip matrix
    res2 = main(["--dataset", "synth", "--data-root", str(tiny_synth), "--split", "val",
                 "--pred-dir", str(tmp_path / "pred")])
    assert res2["labels"]["miou"] == res["ms_flip"]["miou"]


def test_load_model_fn_rebuilds_a_getam_train_run(tmp_path):
    from dataclasses import asdict
    from fixtures import tiny_config
    from getam.train.loop import save_checkpoint
    from getam.train.singlestage import build_model, build_optimizer
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg, 3).eval()
    save_checkpoint(tmp_path, model, build_optimizer(model, cfg), 1, 1, 0, asdict(cfg))
    from getam.train.evaluate import load_model_fn
    fn, info = load_model_fn(tmp_path, "cpu", num_classes=3)
    x = torch.randn(1, 3, 37, 45)   # not a multiple of the patch size: model_fn pads and crops
    with torch.no_grad():
        ref = model.forward_both(F.pad(x, (0, 3, 0, 3)))[1][..., :37, :45]
        assert torch.allclose(fn(x), ref, atol=1e-5)
    assert predict(fn, x, "common", flip=True).shape == (1, 4, 37, 45)
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_model_fn(tmp_path.parent, "cpu")


def test_coco_masks_are_cached_once_and_an_interrupted_cache_is_completed(tmp_path, capsys):
    root = write_coco_standin(tmp_path, "mini", n_images=4, n_instances=12, hw=(24, 32), pool=2, progress=False)
    ds = load_dataset("coco", root, "mini")
    cached = cached_masks("coco", ds, "mini", progress=False)
    out = root / "SegmentationClass" / "mini"
    assert cached.mask_dir == out and len(list(out.glob("*.png"))) == 4
    assert all(torch.equal(cached[i]["mask"], ds[i]["mask"]) for i in range(4))
    (out / "COCO_mini_000000000003.png").unlink()              # an interrupted cache: completed, not trusted
    again = cached_masks("coco", load_dataset("coco", root, "mini"), "mini", progress=False)
    assert len(list(out.glob("*.png"))) == 4 and torch.equal(again[2]["mask"], ds[2]["mask"])
    assert cached_masks("synth", ds, "val") is ds and cached_masks("coco", ds, "mini", cache=False) is ds
    assert "caching the class masks of mini once" in capsys.readouterr().err
