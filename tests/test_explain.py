"""Tests of getam.explain: one call from a user's ViT to normalised, image-sized maps of chosen or predicted classes,
and the overlay."""
import pytest
import numpy as np
import torch

from fixtures import tiny_backbone
from getam.attribution import attention_rollout, chefer_attribution, legrad
from getam.cams import att_gradients, getam, normalize_maps, resize_maps
from getam.explain import explain, overlay
from getam.widgets import colorize


def test_explain_topk_is_getam_of_the_predicted_classes():
    torch.manual_seed(0)
    model = tiny_backbone("eva").eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        logits = model(x)
    exp = explain(model, x, top_k=2)
    top = logits.topk(2, 1).indices
    assert exp.classes == top.tolist()                       # best score first
    want = torch.zeros(2, 4).scatter_(1, top, 1.)
    assert torch.equal(exp.labels, want)
    torch.testing.assert_close(exp.raw, getam(model, x, want))
    torch.testing.assert_close(exp.maps, normalize_maps(resize_maps(getam(model, x, want), (32, 40))))
    torch.testing.assert_close(exp.scores, logits.sigmoid())
    assert exp.maps.device == x.device and exp.maps.dtype == torch.float32
    a = explain(model, x, labels=torch.tensor([1, 2]), method="att_gradients")
    torch.testing.assert_close(a.raw, att_gradients(model, x, torch.tensor([[0., 1, 0, 0], [0, 0, 1, 0]])))
    assert a.classes == [[1], [2]]
    with pytest.raises(ValueError, match="expected one of getam"):
        explain(model, x, method="rise")


@pytest.mark.parametrize("name,fn", [("rollout", attention_rollout), ("chefer", chefer_attribution),
                                     ("legrad", legrad)])
def test_explain_runs_the_attribution_baselines_by_name(name, fn):
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    x = torch.randn(2, 3, 32, 32)
    exp = explain(model, x, labels=[[0, 3], 1], method=name)
    want = torch.tensor([[1., 0, 0, 1], [0, 1, 0, 0]])
    assert torch.equal(exp.labels, want) and exp.maps.shape == (2, 4, 32, 32)
    torch.testing.assert_close(exp.raw, fn(model, x, want))
    torch.testing.assert_close(exp.maps, normalize_maps(resize_maps(fn(model, x, want), (32, 32))))


def test_explain_refuses_models_without_class_token_readout():
    model = tiny_backbone("vit", class_token=False, global_pool="avg").eval()
    with pytest.raises(ValueError, match="global_pool='avg'"):
        explain(model, torch.randn(1, 3, 32, 32))
    assert explain(model, torch.randn(1, 3, 32, 32), method="grad_cam").maps.shape == (1, 4, 32, 32)


def test_overlay_by_hand():
    image = torch.zeros(3, 2, 2, dtype=torch.uint8)
    image[0] = 200
    m = torch.tensor([[0., 1.], [0., 0.]])
    assert torch.equal(overlay(image, m, opacity=0.0), image.permute(1, 2, 0))
    full = overlay(image, m, opacity=1.0, cmap="gray")
    assert full[0, 1].tolist() == [255, 255, 255] and full[0, 0].tolist() == [0, 0, 0]
    half = overlay(image, m, opacity=0.5, cmap="gray")
    assert half[0, 1].tolist() == [228, 128, 128]            # (200 + 255) / 2 = 227.5 → 228, (0 + 255) / 2 → 128
    assert colorize(np.array([[0., 1.]]), "gray").tolist() == [[[0, 0, 0], [255, 255, 255]]]
    # a normalised float image is denormalised first (ImageNet stats by default)
    f = ((torch.full((3, 2, 2), 0.5) - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
         / torch.tensor([0.229, 0.224, 0.225])[:, None, None])
    assert torch.equal(overlay(f, m, opacity=0.0)[0, 0], torch.tensor([128, 128, 128], dtype=torch.uint8))
