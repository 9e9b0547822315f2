"""Tests of getam.completion: PAMR against a per-pixel reference, each rule of Eq. 4 and Eq. 5,
batched vs per-image completion."""
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from getam.completion import (
    activation_argmax, attention_saliency, background_channel, binarize_saliency,
    complete_labels, crf_labels, crf_pseudo_labels, mine_high_activation, mining_thresholds, open_foreground, pamr,
    present_classes, pseudo_labels, saliency_mask, save_pseudo_labels,
)
from getam.metrics import score_folder
from getam.repro.reference import bench_inputs, complete_numpy

DIL = (1, 2, 4, 8, 12, 24)


# ---------------------------------------------------------------- PAMR
def pamr_reference(img: np.ndarray, masks: np.ndarray, dilations=DIL, iters=10) -> np.ndarray:
    "PAMR pixel by pixel, neighbour by neighbour (float64). Replicate padding = clamped coordinates."
    C, H, W = img.shape
    def at(a, y, x): return a[..., min(max(y, 0), H - 1), min(max(x, 0), W - 1)]
    offs = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    nbrs = [(d * dy, d * dx) for d in dilations for dy, dx in offs]
    aff = np.zeros((H, W, len(nbrs)))
    for y in range(H):
        for x in range(W):
            win = [at(img, y + d * dy, x + d * dx) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            std = np.std(np.stack(win), axis=0, ddof=1)
            logits = [np.mean(-np.abs(img[:, y, x] - at(img, y + oy, x + ox)) / (1e-8 + 0.1 * std)) for oy, ox in nbrs]
            e = np.exp(np.array(logits) - max(logits))
            aff[y, x] = e / e.sum()
    m = masks.astype(np.float64)
    for _ in range(iters):
        new = np.zeros_like(m)
        for y in range(H):
            for x in range(W):
                for j, (oy, ox) in enumerate(nbrs): new[:, y, x] += aff[y, x, j] * at(m, y + oy, x + ox)
        m = new
    return m


def test_pamr_equals_slow_reference():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 9, 11, generator=g)
    img[0, :, :, 6:] += 2                       # a strong edge in the first image
    masks = torch.rand(2, 2, 9, 11, generator=g)
    out = pamr(img, masks)
    for b in range(2):
        ref = pamr_reference(img[b].double().numpy(), masks[b].numpy())
        np.testing.assert_allclose(out[b].numpy(), ref, atol=1e-5, rtol=0)
    # other dilations and iteration counts
    out = pamr(img, masks, dilations=(1, 3), iters=2)
    np.testing.assert_allclose(out[1].numpy(), pamr_reference(img[1].double().numpy(), masks[1].numpy(), (1, 3), 2),
                               atol=1e-5, rtol=0)


def test_pamr_resizes_masks_and_keeps_constants():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 16, 16, generator=g)
    small = torch.rand(1, 3, 4, 4, generator=g)
    up = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(pamr(img, small), pamr(img, up))
    # weights sum to 1
    torch.testing.assert_close(pamr(img, torch.full((1, 1, 16, 16), 0.7)), torch.full((1, 1, 16, 16), 0.7))
    # and it refines: one propagation step on a 1x2 image, by hand. With replicate padding each pixel's 8 neighbours
    # at dilation 1 are 5 copies of itself and 3 of the other pixel; its window (centre + 8): 6 of itself, 3 others.
    mask = torch.tensor([[[[1., 0.]]]])
    flat = torch.full((1, 3, 1, 2), 0.5)                   # one colour: std 0, every neighbour weighs 1/8
    torch.testing.assert_close(pamr(flat, mask, dilations=(1,), iters=1), torch.tensor([[[[5 / 8, 3 / 8]]]]))
    torch.testing.assert_close(pamr(flat, mask, dilations=(1,), iters=2), torch.tensor([[[[34 / 64, 30 / 64]]]]))
    edge = torch.zeros(1, 3, 1, 2)
    edge[0, 0, 0, 0] = 1                                   # red | black: red std 1/2, so the other pixel's logit is
    e = math.exp(-1 / (0.1 * 0.5 + 1e-8) / 3)              # -|1 - 0| / (0.1 std) averaged over the 3 channels = -20/3
    by_hand = torch.tensor([[[[5 / (5 + 3 * e), 3 * e / (5 + 3 * e)]]]])   # 0.99924 | 0.00076: almost nothing crosses
    torch.testing.assert_close(pamr(edge, mask, dilations=(1,), iters=1), by_hand, rtol=1e-5, atol=1e-8)


def test_pamr_moves_mass_along_colour_region_not_across_edge():
    img = torch.zeros(1, 3, 40, 40)
    img[:, 0, :, :20] = 1
    img[:, 2, :, 20:] = 1                                          # red | blue
    mask = torch.zeros(1, 1, 40, 40)
    mask[..., 18:22, 14:18] = 1                                    # a blob 2 px from the edge, red side
    out = pamr(img, mask)[0, 0]
    assert out[:, 20:].sum() < 1e-5 * out[:, :20].sum()          # nothing crosses the edge ...
    assert out[18:22, 20:24].max() < 1e-6                          # ... not even to the blue pixels next to the blob
    assert out[2, 2] > 1e-3 and out[38, 5] > 1e-3                  # ... but it reaches far corners of the red region
    assert out[18:22, 14:18].mean() < 1                            # the blob itself spreads out


# ---------------------------------------------------------------- Eq. 4 and the background channel
def test_salient_argmax_salient_background_and_nonsalient():
    maps = torch.zeros(1, 2, 1, 3)
    maps[0, 1] = torch.tensor([[0.9, 0.05, 0.9]])                 # class 1: strong at 0 and 2, weak at 1
    sal = torch.tensor([[[1, 1, 0]]])
    out = complete_labels(maps, torch.tensor([[0., 1.]]), sal)
    # salient argmax | salient background | non-salient (too few to mine)
    assert out.tolist() == [[[2, 255, 0]]]
    pred = torch.tensor([[[4, 0, 4, 0]]])
    assert saliency_mask(pred, torch.tensor([[[1, 1, 0, 0]]])).tolist() == [[[4, 255, 0, 0]]]


def test_gamma_effect():
    maps = torch.tensor([0.05, 0.1, 0.3, 0.6]).view(1, 1, 1, 4)
    lab = torch.ones(1, 1)
    torch.testing.assert_close(background_channel(maps, 2).flatten(), (1 - torch.tensor([0.05, 0.1, 0.3, 0.6])) ** 2)
    two = torch.stack([maps, maps.flip(-1)], 1)[:, :, 0]       # bg uses the max over classes
    torch.testing.assert_close(background_channel(two, 1).flatten(), 1 - torch.tensor([0.6, 0.3, 0.3, 0.6]))
    assert activation_argmax(maps, lab, gamma=1).tolist() == [[[0, 0, 0, 1]]]     # bg 0.95, 0.9, 0.7, 0.4
    # 0.95^32 = 0.19 > 0.05; 0.9^32 = 0.034 < 0.1
    assert activation_argmax(maps, lab, gamma=32).tolist() == [[[0, 1, 1, 1]]]
    g = torch.Generator().manual_seed(0)
    m = torch.rand(2, 3, 16, 16, generator=g) ** 3
    lab = torch.ones(2, 3)
    fg = [(activation_argmax(m, lab, gamma=gm) > 0).float().mean() for gm in (1, 4, 32)]
    assert fg[0] < fg[1] < fg[2]                                   # larger gamma -> more foreground


def test_absent_classes_never_win():
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0] = 1.0
    maps[0, 2, 0, 0] = 0.5
    lab = torch.tensor([[0., 0., 1.]])                             # only class 2 is present
    pred = activation_argmax(maps, lab)
    assert pred.tolist() == [[[3, 0], [0, 0]]]                     # class 0 (absent, maps 1) never wins; zeros -> bg
    assert set(complete_labels(maps, lab, torch.ones(1, 2, 2)).unique().tolist()) <= {3, 255}
    assert activation_argmax(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2)).eq(0).all()   # no class at all: background


def test_saliency_binarisation():
    s = torch.tensor([[[0, 1], [128, 255]]])
    assert binarize_saliency(s).tolist() == [[[0, 1], [1, 1]]]
    assert binarize_saliency(s, 127).tolist() == [[[0, 0], [1, 1]]]
    maps = torch.full((1, 1, 2, 2), 0.9)
    assert complete_labels(maps, torch.ones(1, 1), s, saliency_threshold=127).tolist() == [[[0, 0], [1, 1]]]
    with pytest.raises(ValueError, match="saliency has shape"):
        complete_labels(maps, torch.ones(1, 1), torch.ones(1, 3, 3))


# ---------------------------------------------------------------- Eq. 5
def _line(*cols):
    return torch.stack([torch.tensor(c, dtype=torch.float32) for c in cols])[None, :, None]  # [1, C, 1, W]


def test_threshold_rule_exact():
    m = _line([0.4, 0.1, 0.3, 0.2, 0.0, 0.5])                     # 5 positives -> k = int(5 * .9) = 4 -> t = 0.5
    t, valid = mining_thresholds(m)
    assert t.tolist() == [[0.5]] and valid.tolist() == [[True]]
    t, valid = mining_thresholds(m, alpha=0.5)                   # k = 2 -> third smallest = 0.3
    assert t.tolist() == [[pytest.approx(0.3)]]
    assert mining_thresholds(_line([0.0, 0.7, 0.0]))[1].tolist() == [[False]]          # n = 1: k = 0, no mining
    assert mining_thresholds(m, alpha=1.0)[1].tolist() == [[False]]                     # k >= n, no mining
    assert mining_thresholds(_line([0.0, 0.0]))[1].tolist() == [[False]]                # no positive values


def test_one_high_class_two_high_classes_and_none():
    a = [0.1, 0.2, 0.8, 0.9, 0.0, 0.0, 0.95]                     # alpha .5: 5 positives, k = 2 -> t = .8: high at 3, 6
    b = [0.0, 0.0, 0.1, 0.95, 0.2, 0.9, 0.3]                      # 5 positives, t = .3: high at 3, 5
    maps, lab = _line(a, b), torch.ones(1, 2)
    nonsal, pseg = torch.zeros(1, 1, 7, dtype=torch.long), torch.zeros(1, 1, 7, dtype=torch.long)
    out = mine_high_activation(pseg, maps, lab, nonsal, alpha=0.5).flatten().tolist()
    assert out == [0, 0, 0, 255, 0, 2, 1]                          # two high -> 255; one high -> its class; none -> 0
    sal = torch.tensor([[[0, 0, 0, 1, 0, 1, 0]]])
    pseg = torch.tensor([[[0, 0, 0, 9, 0, 8, 0]]])
    # salient untouched
    assert mine_high_activation(pseg, maps, lab, sal, alpha=0.5).flatten().tolist() == [0, 0, 0, 9, 0, 8, 1]


def test_no_mining_when_too_few_positive_pixels():
    maps = _line([0.0, 0.0, 0.99, 0.0])                            # one positive pixel: k = int(0.9) = 0
    assert complete_labels(maps, torch.ones(1, 1), torch.zeros(1, 1, 4)).flatten().tolist() == [0, 0, 0, 0]
    maps = _line([0.1] * 8 + [0.99, 0.0])                          # 9 positives, k = 8: t = .99, nothing above
    assert complete_labels(maps, torch.ones(1, 1), torch.zeros(1, 1, 10)).flatten().tolist() == [0] * 10
    maps = _line([0.1] * 9 + [0.99])                               # 10 positives, k = 9: t = .99 again
    assert complete_labels(maps, torch.ones(1, 1), torch.zeros(1, 1, 10)).flatten().tolist() == [0] * 10
    maps = _line([0.1] * 19 + [0.99])                              # 20 positives, k = 18: t = .1 -> pixel 19 is high
    assert complete_labels(maps, torch.ones(1, 1), torch.zeros(1, 1, 20)).flatten().tolist() == [0] * 19 + [1]


def test_min_value_ranks_only_values_above_it():
    vals = [1e-6] * 90 + [round(0.1 * i, 1) for i in range(1, 11)]         # 100 positives: k = 90, t = 0.1
    maps, nonsal = _line(vals), torch.zeros(1, 1, 100)
    out = complete_labels(maps, torch.ones(1, 1), nonsal).flatten()
    assert out[:91].eq(0).all() and out[91:].eq(1).all()                   # 0.2 .. 1.0 are mined
    out = complete_labels(maps, torch.ones(1, 1), nonsal, min_value=0.01).flatten()
    assert out.eq(0).all()                                                 # 10 values: k = 9, t = 1.0, none above


def naive_complete(maps, labels, sal, gamma=32, alpha=0.9):
    "Per image, per class, as written in the paper (Sec. 4.2, Eq. 4, Eq. 5), in NumPy."
    out = []
    for m, l, s in zip(maps.numpy().astype(np.float64), labels.numpy(), sal.numpy()):
        cls = [c for c in range(len(l)) if l[c] > 0]
        H, W = m.shape[1:]
        if cls:
            fg = np.stack([m[c] for c in cls])
            bg = (1 - fg.max(0)) ** gamma
            best = np.concatenate([bg[None], fg]).argmax(0)
            pred = np.array([0] + [c + 1 for c in cls])[best]
        else: pred = np.zeros((H, W), np.int64)
        p = np.zeros((H, W), np.int64)
        for y in range(H):
            for x in range(W):
                if s[y, x] == 1: p[y, x] = pred[y, x] if pred[y, x] > 0 else 255
        count, hit = np.zeros((H, W), int), np.zeros((H, W), int)
        for c in cls:
            v = sorted(m[c][m[c] > 0].tolist())
            n = len(v)
            k = int(n * alpha)
            if k == 0 or k >= n: continue
            for y in range(H):
                for x in range(W):
                    if s[y, x] == 0 and m[c, y, x] > v[k]:
                        count[y, x] += 1
                        hit[y, x] = c + 1
        p[(s == 0) & (count == 1)] = hit[(s == 0) & (count == 1)]
        p[(s == 0) & (count > 1)] = 255
        out.append(p)
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("alpha", [0.9, 0.5])
def test_batched_equals_naive_per_image(alpha):
    g = torch.Generator().manual_seed(3)
    B, C, H, W = 5, 6, 12, 14
    maps = (torch.rand(B, C, H, W, generator=g) - 0.4).clamp(min=0) / 0.6           # many exact zeros
    maps[:, :, :3] = torch.rand(B, C, 3, W, generator=g) ** 0.3                       # strong rows -> conflicts
    labels = (torch.rand(B, C, generator=g) < 0.5).float()
    labels[0] = 0                                                                       # an image without classes
    # a class with one positive pixel
    labels[1] = 0
    labels[1, 2] = 1
    maps[1, 2] = 0
    maps[1, 2, 0, 0] = 0.5
    labels[2] = 1                                                                       # all classes present
    sal = (torch.rand(B, H, W, generator=g) < 0.4).long()
    for gamma in (1, 32):
        got = complete_labels(maps.double().float(), labels, sal, gamma=gamma, alpha=alpha)
        want = naive_complete(maps, labels, sal, gamma, alpha)
        assert torch.equal(got, want)
    assert (got == 255).any() and ((got > 0) & (got < 255) & (sal == 0)).any()         # conflicts and mining occurred


def test_released_style_loop_equals_batched():
    image, maps, labels, saliency = bench_inputs(B=2, C=7, K=3, size=48)
    up = F.interpolate(maps, size=(48, 48), mode="bilinear", align_corners=False)
    a = pseudo_labels(image, maps, labels, saliency)
    b = complete_numpy(image.numpy(), up.numpy(), labels.numpy(), saliency.numpy())
    assert (a.numpy() == b).mean() > 0.999


def test_present_classes():
    idx, ok = present_classes(torch.tensor([[0., 1., 0., 1.], [1., 0., 0., 0.], [0., 0., 0., 0.]]))
    assert idx[:, :1].tolist() == [[1], [0], [0]] and idx[0].tolist() == [1, 3]
    assert ok.tolist() == [[True, True], [True, False], [False, False]]


# ---------------------------------------------------------------- opening, attention saliency
def test_opening():
    lbl = torch.zeros(1, 12, 12, dtype=torch.long)
    lbl[0, 1:7, 1:7] = 2
    lbl[0, 9, 9] = 3
    lbl[0, 8:12, 0] = 255
    op = open_foreground(lbl, 3)
    assert (op[0, 9, 9] == 0 and torch.equal(op[0, 1:7, 1:7], lbl[0, 1:7, 1:7])
            and torch.equal(op[0, 8:, 0], lbl[0, 8:, 0]))
    corner = torch.zeros(1, 10, 10, dtype=torch.long)
    corner[0, :4, :4] = 1
    assert torch.equal(open_foreground(corner, 4), corner)        # outside the image counts as foreground (as OpenCV)
    mid = torch.zeros(1, 12, 12, dtype=torch.long)
    mid[0, 3:7, 4:8] = 5
    assert torch.equal(open_foreground(mid, 4), mid) and open_foreground(mid, 5).eq(0).all()
    maps = torch.zeros(1, 1, 12, 12)
    maps[0, 0, 9, 9] = 1.0
    maps[0, 0, 1:7, 1:7] = 1.0
    sal = torch.ones(1, 12, 12)
    assert complete_labels(maps, torch.ones(1, 1), sal)[0, 9, 9] == 1
    assert complete_labels(maps, torch.ones(1, 1), sal, opening=3)[0, 9, 9] == 0


def test_attention_saliency_mode():
    img = torch.zeros(1, 3, 32, 32)
    img[:, 1, 8:24, 8:24] = 1
    a_cls = torch.zeros(1, 4, 4)
    a_cls[0, 1:3, 1:3] = 1
    s = attention_saliency(a_cls, img)
    assert s.shape == (1, 32, 32) and s[0, 16, 16] == 1 and s[0, 1, 1] == 0
    assert set(s.unique().tolist()) <= {0, 1}
    maps = torch.rand(1, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    lab = torch.tensor([[1., 1.]])
    torch.testing.assert_close(complete_labels(maps, lab, "attention", a_cls=a_cls, image=img),
                               complete_labels(maps, lab, s))
    # pseudo_labels passes the image on
    out = pseudo_labels(img, maps[..., ::4, ::4], lab, "attention", a_cls=a_cls)
    assert out.shape == (1, 32, 32) and out[0, 0, 0] == 0 and out[0, 16, 16] in (1, 2, 255)
    with pytest.raises(ValueError, match="a_cls"): complete_labels(maps, lab, "attention")
    with pytest.raises(ValueError, match="attention"): complete_labels(maps, lab, "something")


# ---------------------------------------------------------------- CRF baseline
def test_crf_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match="pip install pydensecrf2"):
        crf_labels(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), 0.5, np.float32))


def test_crf_snaps_to_colour_edge():
    pytest.importorskip("pydensecrf.densecrf")
    img = np.zeros((16, 24, 3), np.uint8)
    img[:, :12] = (200, 40, 40)
    img[:, 12:] = (40, 40, 200)
    maps = np.zeros((3, 16, 24), np.float32)
    maps[1] = 0.2
    maps[1, :, 8:] = 0.6   # class 1 overflows by 4 columns
    out = crf_pseudo_labels(img, maps, [0, 1, 0], gamma=1)
    assert out.dtype == np.int64 and (out[:, :12] == 0).all() and (out[:, 12:] == 2).all()
    probs = np.stack([1 - maps[1], maps[1]])
    assert (crf_labels(img, probs) == out // 2).all()


# ---------------------------------------------------------------- I/O
def test_save_and_score(tmp_path):
    gt = np.zeros((2, 4, 4), np.uint8)
    gt[:, :2] = 1
    gt[1, 3, 3] = 255
    pr = gt.copy()
    pr[0, 0, 0] = 255
    pr[1, 3, 3] = 2
    pr[1, 3, 2] = 2
    paths = save_pseudo_labels(torch.from_numpy(pr), ["a", "b"], tmp_path / "pred")
    save_pseudo_labels(torch.from_numpy(gt), ["a", "b"], tmp_path / "gt")
    assert [p.name for p in paths] == ["a.png", "b.png"] and not list((tmp_path / "pred").glob(".*"))
    from PIL import Image
    im = Image.open(paths[0])
    assert im.mode == "P" and np.array_equal(np.asarray(im), pr[0])
    r = score_folder(tmp_path / "pred", tmp_path / "gt", num_classes=3, progress=False)
    # bg: 15 gt pixels, 14 right (one became 2); class 1: 16 gt, one marked 255 -> 15/16;
    # class 2: no gt, 1 predicted -> 0
    assert int(r.mat.sum() + r.missed.sum()) == 31 and r.miou() == pytest.approx((14 / 15 + 15 / 16 + 0) / 3)
    assert r.iou().tolist() == pytest.approx([14 / 15, 15 / 16, 0.0])
    assert r.ignored_share() == pytest.approx(1 / 31)
    (tmp_path / "gt" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="b.png"):
        score_folder(tmp_path / "pred", tmp_path / "gt", 3, progress=False)


# ---------------------------------------------------------------- SynthVOC end to end
@pytest.mark.slow
def test_synthvoc_stages(tmp_path):
    from getam.cams import normalize_maps
    from getam.completion import gather_classes
    from getam.repro.reference import standin_maps
    from getam.data import load_dataset
    from getam.images import read_png
    from getam.metrics import ConfusionMatrix
    from getam.synth import make_synthvoc
    root = make_synthvoc(tmp_path / "s", seed=1, n_train=8, n_val=0, size=64)
    ds = load_dataset("synth", root, "train", saliency_root=root / "SaliencyMaps")
    items = [ds[i] for i in range(len(ds))]
    image = torch.stack([it["image"] for it in items]).float()
    gt = torch.stack([it["mask"] for it in items])
    lab = torch.stack([it["label"] for it in items])
    sal = torch.stack([it["saliency"] for it in items])
    part = torch.stack([torch.from_numpy(read_png(root / "SegmentationPart" / f"{it['name']}.png")).long()
                        for it in items])
    raw = standin_maps(gt, part, ds.num_classes)
    labels = pseudo_labels(image, raw, lab, sal)
    idx, ok = present_classes(lab)
    ref = normalize_maps(pamr(image, gather_classes(raw, idx)), eps=1e-5) * ok[:, :, None, None]
    maps = torch.zeros_like(raw).scatter_(1, idx[:, :, None, None].expand_as(ref), ref)
    assert torch.equal(labels, complete_labels(maps, lab, sal))
    assert torch.equal(labels, naive_complete(maps, lab, sal))
    cm = ConfusionMatrix(ds.num_classes + 1).update(labels, gt)
    assert cm.miou() > 0.3


def test_pseudo_labels_is_pamr_then_completion_of_the_present_classes():
    """pseudo_labels = resize, PAMR on the present classes' [B, K] slots, max-normalise, complete_labels;
    bitwise, any K per image."""
    from getam.cams import normalize_maps
    from getam.completion import gather_classes
    g = torch.Generator().manual_seed(3)
    image = torch.randn(3, 3, 20, 24, generator=g)
    raw = torch.rand(3, 4, 5, 6, generator=g)
    lab = torch.tensor([[1., 1., 0., 1.], [0., 0., 1., 0.], [0., 0., 0., 0.]])  # K = 3, 1, 0
    sal = (torch.rand(3, 20, 24, generator=g) > 0.5).long()
    idx, ok = present_classes(lab)
    up = torch.nn.functional.interpolate(raw * (lab[:, :, None, None] > 0),
                                         size=(20, 24), mode="bilinear", align_corners=False)
    ref = normalize_maps(pamr(image, gather_classes(up, idx)).clamp(min=0), eps=1e-5) * ok[:, :, None, None]
    maps = torch.zeros_like(up).scatter_(1, idx[:, :, None, None].expand_as(ref), ref)
    assert torch.equal(pseudo_labels(image, raw, lab, sal), complete_labels(maps, lab, sal))
    # Eq. 4: salient, no class -> ignore
    assert torch.equal(pseudo_labels(image[2:], raw[2:], lab[2:], sal[2:]), sal[2:] * 255)
    lab2 = torch.tensor([[1., 1., 0., 0.], [0., 0., 1., 1.]])  # no padding slots at all
    idx, ok = present_classes(lab2)
    up = torch.nn.functional.interpolate(raw[:2] * (lab2[:, :, None, None] > 0),
                                         size=(20, 24), mode="bilinear", align_corners=False)
    ref = normalize_maps(pamr(image[:2], gather_classes(up, idx)).clamp(min=0), eps=1e-5) * ok[:, :, None, None]
    maps = torch.zeros_like(up).scatter_(1, idx[:, :, None, None].expand_as(ref), ref)
    assert torch.equal(pseudo_labels(image[:2], raw[:2], lab2, sal[:2]), complete_labels(maps, lab2, sal[:2]))
