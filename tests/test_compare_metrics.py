"""getam.faithfulness against the libraries people cite: deletion / insertion = torchcam's `DeletionInsertionMetric`,
the pointing game = quantus's `PointingGame`, the energy pointing game = quantus's `AttributionLocalisation`, each under
the setting named in nbs/25_faithfulness ("Checked against quantus and torchcam"), per (image, class) pair, on the same
tiny ViT, images and maps. The differences that table names are pinned here too, so that its prose stays true.

Tolerances: deletion / insertion compare AUCs of the same float32 model's scores on the same perturbed images, batched
differently (atol 1e-6: a few float32 ulps of scores of order 1); the energy share is a ratio of float32 sums of 256
terms added in another order by numpy and torch (rtol 1e-5); pointing-game hits are booleans, compared exactly."""
import contextlib
import inspect
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

quantus = pytest.importorskip("quantus")
torchcam_metrics = pytest.importorskip("torchcam.metrics")

from fixtures import tiny_backbone                                            # noqa: E402
from getam.cams import resize_maps                                            # noqa: E402
from getam.faithfulness import blur, deletion_insertion, energy_pointing_game, pointing_game  # noqa: E402


# ---------------------------------------------------------------- deletion / insertion vs torchcam
class FixedCams:
    """The CAM-extractor protocol torchcam's metrics call (`model`, `__call__`, `fuse_cams`, `_hooks_off`), handing
    back maps we set: torchcam then ranks pixels by exactly the maps our function gets."""
    def __init__(self, model):
        self.model, self.cams = model, None

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.cams]

    def fuse_cams(self, cams):
        return cams[0]

    @contextlib.contextmanager
    def _hooks_off(self):
        yield


def vit_case():
    "A tiny ViT, 3 images of 16×24 px (384 pixels), maps on the 2×3 patch grid, 5 present (image, class) pairs."
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    images = torch.randn(3, 3, 16, 24)
    maps = torch.rand(3, 4, 2, 3)
    labels = torch.tensor([[1., 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
    return model, images, maps, labels


def torchcam_aucs(model, images, maps, rows, classes, mode, **kwargs):
    """torchcam's AUC of each pair (image `rows[k]`, class `classes[k]`), one pair per `update` (its state keeps sums
    only), and its mean over all pairs from one batched `update`."""
    cams = FixedCams(model)
    metric = torchcam_metrics.DeletionInsertionMetric(cams, **kwargs)
    key = f"{mode}_auc"
    per_pair = []
    for b, c in zip(rows.tolist(), classes.tolist()):
        metric.reset()
        cams.cams = maps[b, c][None]
        metric.update(images[b:b + 1], [c])
        per_pair.append(metric.summary()[key])
    metric.reset()
    cams.cams = maps[rows, classes]
    metric.update(images[rows], classes.tolist())
    return torch.tensor(per_pair), metric.summary()[key]


SIGMOID, SOFTMAX = torch.sigmoid, partial(torch.softmax, dim=-1)
# (mode, our baseline, torchcam's baseline, our score, torchcam's logits_fn): None is each side's default
TORCHCAM_CASES = {
    "deletion-defaults": ("deletion", None, None, "sigmoid", SIGMOID),       # both delete to zeros
    "insertion-defaults": ("insertion", None, blur, "sigmoid", SIGMOID),     # ours inserts into the blur by default
    "deletion-to-blur": ("deletion", blur, blur, "sigmoid", SIGMOID),
    "insertion-from-zeros": ("insertion", torch.zeros_like, None, "sigmoid", SIGMOID),
    "deletion-logit": ("deletion", None, None, "logit", None),
    "insertion-softmax": ("insertion", None, blur, "softmax", SOFTMAX),
}


@pytest.mark.parametrize("case", list(TORCHCAM_CASES))
def test_deletion_insertion_equals_torchcam(case):
    """With `steps` dividing H·W (8 steps of 48 of the 384 pixels), the same baseline and the same score, our AUC of
    every pair equals torchcam's, and so does the mean over pairs."""
    mode, ours_base, theirs_base, score, logits_fn = TORCHCAM_CASES[case]
    model, images, maps, labels = vit_case()
    baseline = None if ours_base is None else ours_base(images)
    ours = deletion_insertion(model, images, maps, labels, mode, steps=8, baseline=baseline, score=score,
                              batch_size=7)
    per_pair, mean = torchcam_aucs(model, images, maps, ours.rows, ours.classes, mode, steps=8,
                                   baseline=theirs_base, logits_fn=logits_fn)
    torch.testing.assert_close(ours.auc, per_pair, rtol=0, atol=1e-6)
    assert mean == pytest.approx(ours.auc.mean().item(), abs=1e-6)
    torch.testing.assert_close(ours.auc, torch.trapezoid(ours.curves, dx=1 / 8, dim=1))   # torchcam's AUC rule


def test_torchcam_step_grid_when_steps_do_not_divide_the_pixels():
    """7 steps over 384 pixels: we change round(t·384/7) pixels at step t, torchcam multiples of ceil(384/7) = 55 and
    then all 384, integrating over its uneven fractions. Same curve, sampled elsewhere: the AUCs differ, a little."""
    model, images, maps, labels = vit_case()
    ours = deletion_insertion(model, images, maps, labels, "deletion", steps=7)
    per_pair, _ = torchcam_aucs(model, images, maps, ours.rows, ours.classes, "deletion", steps=7,
                                logits_fn=SIGMOID)
    gap = (ours.auc - per_pair).abs()
    assert gap.max() > 1e-5 and gap.max() < 1e-2


def test_the_defaults_the_table_names():
    "Our defaults and the libraries' that nbs/25_faithfulness's table says differ."
    ours = inspect.signature(deletion_insertion).parameters
    theirs = inspect.signature(torchcam_metrics.DeletionInsertionMetric).parameters
    assert (ours["steps"].default, theirs["steps"].default) == (16, 20)
    assert (ours["score"].default, theirs["logits_fn"].default) == ("sigmoid", None)
    assert inspect.signature(pointing_game).parameters["tolerance"].default == 0
    assert inspect.signature(energy_pointing_game).parameters["region"].default == "box"
    loc = inspect.signature(quantus.AttributionLocalisation).parameters
    assert (loc["abs"].default, loc["positive_attributions"].default, loc["normalise"].default) == (True, False, True)
    pg = inspect.signature(quantus.PointingGame).parameters
    assert (pg["abs"].default, pg["normalise"].default, pg["weighted"].default) == (False, True, False)


# ---------------------------------------------------------------- pointing games vs quantus
def mask_case(seed=1, B=4, C=3, H=16, W=16):
    "Masks of 4×4-px cells of random classes (some cells 255), labels = the classes present, maps [B, C, 4, 4]."
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, C + 2, (B, H // 4, W // 4), generator=g)
    cells[cells == C + 1] = 255
    masks = cells.repeat_interleave(4, 1).repeat_interleave(4, 2)
    labels = torch.stack([torch.stack([(masks[b] == c + 1).any() for c in range(C)]) for b in range(B)]).float()
    return masks, labels, g


def regions_of(masks, rows, classes, region="mask"):
    "Bool [P, H, W]: class `classes[k]`'s pixels in `masks[rows[k]]`, or the box from their extreme rows and columns."
    out = torch.zeros(len(rows), *masks.shape[-2:], dtype=torch.bool)
    for k, (b, c) in enumerate(zip(rows.tolist(), classes.tolist())):
        on = masks[b] == c + 1
        if region == "mask" or not on.any():
            out[k] = on
            continue
        ys, xs = on.nonzero(as_tuple=True)
        out[k, ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    return out


def quantus_scores(metric, maps, masks, rows, classes, region="mask", regions=None):
    """quantus's per-sample scores, one sample per present pair: `a_batch` our map resized to the mask, `s_batch` the
    class's region (`regions_of`, or `regions`); `x_batch` only gives the shapes (these metrics never call a model)."""
    H, W = masks.shape[-2:]
    a = resize_maps(maps, (H, W))[rows, classes][:, None].numpy()
    s = regions_of(masks, rows, classes, region) if regions is None else regions
    x = np.zeros((len(rows), 3, H, W), np.float32)
    out = metric(model=None, x_batch=x, y_batch=classes.numpy(), a_batch=a,
                 s_batch=s[:, None].numpy().astype(np.float32), channel_first=True)
    return np.asarray(out, dtype=np.float64)


def dilate(regions, tolerance):
    "Pixels within `tolerance` (Euclidean) of `regions` [P, H, W], by brute-force distances (no convolution)."
    P, H, W = regions.shape
    grid = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1).view(-1, 2).float()
    out = torch.zeros(P, H * W, dtype=torch.bool)
    for p in range(P):
        inside = grid[regions[p].flatten()]
        if len(inside): out[p] = torch.cdist(grid, inside).amin(1) <= tolerance
    return out.view(P, H, W)


@pytest.mark.parametrize("tolerance", [0, 3])
def test_pointing_game_equals_quantus(tolerance):
    """Maps with one maximum each (random, on the mask grid): our hits = quantus's `PointingGame` with its defaults
    (normalising by the batch's max does not move a maximum), given the class's mask; with `tolerance` t, given the
    mask grown by t px. quantus averages over samples where we average per class first: the sample mean agrees."""
    masks, labels, g = mask_case()
    maps = torch.randn(len(masks), labels.shape[1], 16, 16, generator=g)
    ours = pointing_game(maps, labels, masks, tolerance=tolerance)
    regions = dilate(regions_of(masks, ours.rows, ours.classes), tolerance)
    theirs = quantus_scores(quantus.PointingGame(disable_warnings=True), maps, masks, ours.rows, ours.classes,
                            regions=regions)
    assert 0 < ours.values.sum() < len(ours.values)                  # hits and misses both
    np.testing.assert_array_equal(ours.values.numpy(), theirs)
    mean = quantus.PointingGame(disable_warnings=True, return_aggregate=True)
    assert quantus_scores(mean, maps, masks, ours.rows, ours.classes, regions=regions)[0] == ours.values.mean()


def test_pointing_game_differs_from_quantus_on_ties_empty_maps_and_empty_masks():
    """Where quantus's `PointingGame` and ours part: a tied maximum (a patch-grid map upsampled ×4 peaks on a 2×2 block)
    is our first in raster order and any of them for quantus; an all-zero map is our miss and quantus's hit (every pixel
    is a maximum); a class absent from the mask is our miss and quantus's hit (its NaN, written into a bool array)."""
    mask = torch.zeros(3, 16, 16, dtype=torch.long)
    mask[0, 6, 6] = 1                       # only the bottom-right pixel of the tied 2×2 peak at (5..6, 5..6)
    mask[1, 0, 0] = 1
    labels = torch.tensor([[1.], [1.], [1.]])
    maps = torch.zeros(3, 1, 4, 4)
    maps[0, 0, 1, 1] = 1                    # upsampled ×4: the peak is the tied block rows 5..6, cols 5..6
    maps[2, 0, 1, 1] = 1                    # image 2 has no pixel of class 0
    big = resize_maps(maps, (16, 16))
    assert (big[0, 0] == big[0, 0].max()).sum() == 4
    ours = pointing_game(maps, labels, mask)
    theirs = quantus_scores(quantus.PointingGame(disable_warnings=True), maps, mask, ours.rows, ours.classes)
    assert ours.values.tolist() == [0., 0., 0.] and theirs.tolist() == [1., 1., 1.]


@pytest.mark.parametrize("region", ["box", "mask"])
def test_energy_pointing_game_equals_quantus(region):
    """Maps with negative values on a 4×4 grid, resized to the mask: our share of the positive energy inside the class's
    box (or mask) = quantus's `AttributionLocalisation` with `abs=False, positive_attributions=True` (its ReLU), given
    that region; its normalisation by the batch's max cancels in the ratio."""
    masks, labels, g = mask_case(seed=2)
    maps = torch.randn(len(masks), labels.shape[1], 4, 4, generator=g)
    ours = energy_pointing_game(maps, labels, masks, region=region)
    metric = quantus.AttributionLocalisation(abs=False, positive_attributions=True, disable_warnings=True)
    theirs = quantus_scores(metric, maps, masks, ours.rows, ours.classes, region)
    assert (ours.values > 0).all() and (ours.values < 1).any()
    np.testing.assert_allclose(ours.values.numpy(), theirs, rtol=1e-5, atol=1e-7)


def test_energy_pointing_game_and_quantus_defaults():
    """quantus's defaults take |map| (`abs=True`), we take its positive part: equal on non-negative maps (GETAM's, after
    its ReLU), apart on maps with negative values. A class absent from the mask: our 0, quantus's NaN."""
    masks, labels, g = mask_case(seed=2)
    maps = torch.randn(len(masks), labels.shape[1], 4, 4, generator=g)
    default = quantus.AttributionLocalisation(disable_warnings=True)
    for m, same in ((F.relu(maps), True), (maps, False)):
        ours = energy_pointing_game(m, labels, masks)
        theirs = quantus_scores(default, m, masks, ours.rows, ours.classes, "box")
        assert np.allclose(ours.values.numpy(), theirs, rtol=1e-5, atol=1e-7) == same
    empty = energy_pointing_game(torch.rand(1, 1, 16, 16), torch.ones(1, 1), torch.zeros(1, 16, 16, dtype=torch.long))
    assert empty.values.tolist() == [0.]
    x = np.zeros((3, 3, 16, 16), np.float32)
    s = np.zeros((3, 1, 16, 16), np.float32)
    s[:2, 0, 0, 0] = 1
    a = np.random.default_rng(0).random((3, 1, 16, 16)).astype(np.float32)
    assert np.isnan(default(model=None, x_batch=x, y_batch=np.zeros(3, int), a_batch=a, s_batch=s,
                            channel_first=True)[2])
