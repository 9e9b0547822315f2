"""Tests of getam.faithfulness: deletion / insertion AUC, pointing games and pseudo-label mIoU on hand-made maps
with known answers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from getam.faithfulness import (blur, class_regions, deletion_insertion, energy_pointing_game, pixel_ranks,
                                pointing_game, pseudo_label_miou, trapezoid_auc)


class ObjectFraction(nn.Module):
    "Class c's logit = the mean of channel 0 over object c's pixels: the fraction of object c still present."
    def __init__(self, objects):               # objects: [C, H, W] {0, 1}
        super().__init__()
        self.objects = objects

    def forward(self, x):
        return torch.einsum("bhw,chw->bc", x[:, 0], self.objects) / self.objects.flatten(1).sum(1)


def two_objects(H=6, W=6):
    objects = torch.zeros(2, H, W)
    objects[0, :2, :3] = 1          # 6 pixels
    objects[1, 4:, 3:] = 1          # 6 pixels
    return objects


def test_object_first_beats_its_reverse_exactly():
    "36 pixels, 36 steps: the object-first map deletes the 6-pixel object in 6 steps; its reverse in the last 6."
    objects = two_objects()
    model, img = ObjectFraction(objects), torch.ones(1, 3, 6, 6)
    lab = torch.tensor([[1., 0]])
    good = (objects[0] + 0.01 * torch.arange(36.).view(6, 6))[None, None].expand(1, 2, 6, 6)
    bad = 1 - good
    kw = dict(steps=36, score="logit")
    d_good = deletion_insertion(model, img, good, lab, **kw)
    d_bad = deletion_insertion(model, img, bad, lab, **kw)
    # curve: 1 - t/6 for t <= 6, then 0 → sum = 3.5, AUC = (3.5 - 0.5) / 36
    torch.testing.assert_close(d_good.auc, torch.tensor([3 / 36]))
    # reverse: 1 for t <= 30, then 5/6 .. 0 → sum = 31 + 2.5 = 33.5, AUC = 33 / 36
    torch.testing.assert_close(d_bad.auc, torch.tensor([33 / 36]))
    z = torch.zeros_like(img)
    i_good = deletion_insertion(model, img, good, lab, "insertion", baseline=z, **kw)
    i_bad = deletion_insertion(model, img, bad, lab, "insertion", baseline=z, **kw)
    torch.testing.assert_close(i_good.auc, torch.tensor([33 / 36]))
    torch.testing.assert_close(i_bad.auc, torch.tensor([3 / 36]))
    assert d_good.rows.tolist() == [0] and d_good.classes.tolist() == [0] and d_good.curves.shape == (1, 37)


def naive_curve(model, image, m, c, mode, steps, baseline):
    "One (image, class) pair, one step at a time, with Python sorting."
    H, W = image.shape[-2:]
    big = F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0].flatten().tolist()
    order = sorted(range(H * W), key=lambda i: (-big[i], i))
    out = []
    for t in range(steps + 1):
        n = round(t * H * W / steps)
        chosen = torch.zeros(H * W, dtype=torch.bool)
        chosen[order[:n]] = True
        chosen = chosen.view(1, H, W)
        x = torch.where(chosen, baseline, image) if mode == "deletion" else torch.where(chosen, image, baseline)
        out.append(torch.sigmoid(model(x[None]))[0, c].item())
    return torch.tensor(out)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_batched_curves_equal_naive_loop(mode):
    "A real (tiny) ViT, maps on the patch grid, several pairs per image, chunks that split pairs: = the per-pair loop."
    from fixtures import tiny_backbone
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    x = torch.randn(3, 3, 16, 24)
    maps = torch.rand(3, 4, 2, 3)
    labels = torch.tensor([[1., 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
    res = deletion_insertion(model, x, maps, labels, mode, steps=7, batch_size=5)
    base = torch.zeros_like(x) if mode == "deletion" else blur(x)
    assert res.rows.tolist() == [0, 0, 2, 2, 2] and res.classes.tolist() == [0, 2, 1, 2, 3]
    for k, (b, c) in enumerate(zip(res.rows.tolist(), res.classes.tolist())):
        want = naive_curve(model, x[b], maps[b, c], c, mode, 7, base[b])
        torch.testing.assert_close(res.curves[k], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.auc, torch.trapezoid(res.curves, dx=1 / 7, dim=1))


def test_ranks_trapezoid_and_blur_by_hand():
    assert pixel_ranks(torch.tensor([[[0.5, 2.0], [0.5, 1.0]]])).tolist() == [[2, 0, 3, 1]]   # ties by index
    torch.testing.assert_close(trapezoid_auc(torch.tensor([[1., 0.5, 0.]])), torch.tensor([0.5]))
    x = torch.zeros(1, 3, 21, 21)
    x[..., 10, 10] = 1
    b = blur(x)
    torch.testing.assert_close(b.sum((-2, -1)), torch.ones(1, 3))          # mass preserved away from the border
    g = torch.exp(-torch.arange(-5., 6) ** 2 / 50)
    g = g / g.sum()
    torch.testing.assert_close(b[0, 0, 5:16, 10], g * g[5])                # separable Gaussian, sigma 5
    torch.testing.assert_close(blur(torch.full((2, 3, 8, 8), 0.3)), torch.full((2, 3, 8, 8), 0.3))


def test_bad_arguments_are_named():
    m = ObjectFraction(two_objects())
    with pytest.raises(ValueError, match="'deletion' or 'insertion'"):
        deletion_insertion(m, torch.ones(1, 3, 6, 6), torch.ones(1, 2, 6, 6), torch.ones(1, 2), mode="drop")
    with pytest.raises(ValueError, match="expected \\[B, C, h, w\\] and \\[B, C\\]"):
        deletion_insertion(m, torch.ones(1, 3, 6, 6), torch.ones(1, 3, 6, 6), torch.ones(1, 2))


def hand_mask():
    mask = torch.zeros(2, 8, 8, dtype=torch.long)
    mask[0, 2:4, 3:6] = 1         # class 0: a 2×3 block
    mask[0, 7, 7] = 2             # class 1: one pixel
    mask[1, 0, 0] = 1
    mask[1, 5, 6] = 1             # class 0 in two places: its box is rows 0..5, cols 0..6
    mask[1, 6, :] = 255
    return mask


def test_pointing_game_by_hand():
    mask, lab = hand_mask(), torch.tensor([[1., 1], [1., 0]])
    m = torch.zeros(2, 2, 8, 8)
    m[0, 0, 3, 4] = 2
    m[0, 0, 0, 0] = 1                              # hit
    m[0, 1, 0, 0] = 1                              # miss
    m[1, 0, 5, 6] = 1                              # hit (second part of class 0)
    r = pointing_game(m, lab, mask)
    assert r.rows.tolist() == [0, 0, 1] and r.classes.tolist() == [0, 1, 0]
    assert r.values.tolist() == [1., 0., 1.]
    assert r.mean == pytest.approx((1.0 + 0.0) / 2)           # per-class hit rates 1 and 0, averaged over classes
    assert pointing_game(torch.zeros(2, 2, 8, 8), lab, mask).values.tolist() == [0., 0., 0.]  # zero maps miss
    m[0, 1, 0, 0] = 0
    m[0, 1, 7, 4] = 1                                          # 3 px from class 1's pixel
    assert pointing_game(m, lab, mask, tolerance=2).values.tolist() == [1., 0., 1.]
    assert pointing_game(m, lab, mask, tolerance=3).values.tolist() == [1., 1., 1.]
    # a map on a coarser grid is resized to the mask first: a 4×4 map whose max cell covers pixels 4..5 × 4..5
    coarse = torch.zeros(2, 2, 4, 4)
    coarse[1, 0, 2, 2] = 1
    assert pointing_game(coarse, torch.tensor([[0., 0], [1., 0]]), mask).values.tolist() == [0.]


def test_energy_pointing_game_by_hand():
    mask, lab = hand_mask(), torch.tensor([[1., 1], [1., 0]])
    m = torch.zeros(2, 2, 8, 8)
    m[0, 0, 2, 3] = 3
    m[0, 0, 7, 0] = 1
    m[0, 0, 3, 4] = -5                                           # negative values carry no energy
    m[0, 1] = 1                                                  # uniform: 1 / 64 inside the one-pixel box
    m[1, 0, 0, 7] = 1                                            # (0, 7) outside the box (cols 0..6),
    m[1, 0, 3, 3] = 1                                            # (3, 3) inside, not in mask
    box = energy_pointing_game(m, lab, mask)
    torch.testing.assert_close(box.values, torch.tensor([3 / 4, 1 / 64, 1 / 2]))
    msk = energy_pointing_game(m, lab, mask, region="mask")
    torch.testing.assert_close(msk.values, torch.tensor([3 / 4, 1 / 64, 0.]))
    assert class_regions(mask, torch.tensor([1]), torch.tensor([0]), "box")[0].sum().item() == 6 * 7
    assert energy_pointing_game(torch.zeros(2, 2, 8, 8), lab, mask).values.tolist() == [0., 0., 0.]
    # object-first beats its reverse
    good = (mask == 1).float()[:, None].expand(2, 2, 8, 8)
    assert (energy_pointing_game(good, lab, mask).values[0] == 1
            and energy_pointing_game(1 - good, lab, mask).values[0] == 0)


def test_pseudo_label_miou_known_values():
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, :4] = 1   # top half class 0
    lab = torch.tensor([[1., 0]])
    sal = (mask > 0).long()
    perfect = (mask == 1).float()[:, None].repeat(1, 2, 1, 1)
    perfect[:, 1] = 0
    score = pseudo_label_miou(torch.zeros(1, 3, 8, 8), perfect, lab, sal, mask, 2, refine=False)
    assert score.miou == pytest.approx(100.)
    # saliency covering everything and a flat map: every pixel is predicted class 0 → bg IoU 0, class-0 IoU 1/2;
    # class 1 absent
    flat = torch.zeros(1, 2, 8, 8)
    flat[:, 0] = 1
    got = pseudo_label_miou(torch.zeros(1, 3, 8, 8), flat, lab, torch.ones_like(mask), mask, 2, refine=False).miou
    assert got == pytest.approx(100 * (0 + 0.5) / 2)
