"The two-branch model: shapes, shared backbone, DPT hooks, hybrid features, GETAM on it unchanged."
import pytest
import timm
import torch
import torch.nn as nn

from getam.model import GetamSegmenter, DPTDecoder, Readout, default_hooks
from fixtures import tiny_backbone
from getam.backbones import vit_of
from getam.cams import getam


def tiny(num_classes=3, **kw):
    torch.manual_seed(0)
    return GetamSegmenter(tiny_backbone("vit", num_classes=num_classes, depth=4, **kw),
                          num_classes=num_classes, features=16).eval()


def test_default_hooks_match_the_released_dpt():
    assert default_hooks(12) == [2, 5, 8, 11]
    assert default_hooks(4) == [0, 1, 2, 3]
    assert default_hooks(8) == [1, 3, 5, 7]
    with pytest.raises(ValueError, match="at least 4"): default_hooks(3)


def test_forward_is_the_classifier_and_forward_both_adds_segmentation():
    m = tiny()
    x = torch.randn(2, 3, 40, 56)  # patch 8: a 5x7 grid, not a power of two
    cls, seg = m.forward_both(x)
    assert cls.shape == (2, 3) and seg.shape == (2, 4, 40, 56)
    torch.testing.assert_close(cls, m(x))
    assert m.backbone is vit_of(m) and isinstance(m.backbone, timm.models.vision_transformer.VisionTransformer)


def test_decoder_depends_on_the_hooked_blocks_only():
    m = tiny()
    m.vit_hooks = [0, 1, 2, 2]  # block 3 feeds only the classifier now
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    _, seg = m.forward_both(x)
    seg.sum().backward()
    assert m.backbone.blocks[3].mlp.fc2.weight.grad is None
    assert m.backbone.blocks[2].mlp.fc2.weight.grad is not None


def test_readout_project_concatenates_the_class_token():
    r = Readout(4, "project")
    x, cls = torch.randn(1, 4, 2, 2), torch.randn(1, 1, 4)
    lin = r.proj[0]
    want = torch.nn.functional.gelu(
        torch.einsum("oc,chw->ohw", lin.weight, torch.cat([x[0], cls[0, 0][:, None, None].expand(4, 2, 2)]))
        + lin.bias[:, None, None])
    torch.testing.assert_close(r(x, cls)[0], want)
    assert torch.equal(Readout(4, "ignore")(x, cls), x)
    torch.testing.assert_close(Readout(4, "add")(x, cls), x + cls[0, 0][None, :, None, None])


def test_fusion_blocks_have_batchnorm_and_head_outputs_C_plus_1():
    d = DPTDecoder([32] * 4, [16] * 4, num_outputs=21, features=8)
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in d.fusion.modules()) == 4 * 2 * 2
    assert d.head[-1].out_channels == 21 and isinstance(d.head[1], nn.BatchNorm2d) and isinstance(d.head[3], nn.Dropout)


def test_getam_works_on_the_model_unchanged():
    m = tiny()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    maps = getam(m, x, labels)
    assert maps.shape == (2, 3, 4, 4)
    assert (maps[labels == 0] == 0).all() and (maps[labels == 1].flatten(1).amax(1) > 0).all()
    torch.testing.assert_close(maps, getam(m.backbone, x, labels))  # the same maps as on the bare ViT


@pytest.mark.slow
def test_hybrid_takes_two_resnet_stages():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_r26_s32_224", num_classes=2, depth=4, img_size=64, dynamic_img_size=True)
    m = GetamSegmenter(vit, num_classes=2, features=16).eval()
    assert m.is_hybrid and m.vit_hooks == [2, 3] and m.decoder.n_cnn == 2
    assert [c.in_channels for c in m.decoder.reassemble[:2]] == [256, 512]
    assert m.forward_both(torch.randn(1, 3, 64, 64))[1].shape == (1, 3, 64, 64)


def test_pooled_head_and_bad_inputs():
    m = GetamSegmenter("vit_tiny_patch16_224", num_classes=2, img_size=32, cls_head="pooled", depth=4, patch_size=8)
    assert m.backbone.global_pool == "avg"
    with pytest.raises(ValueError, match="valid: token, pooled"):
        GetamSegmenter(tiny_backbone(depth=4), num_classes=4, cls_head="gap")
    with pytest.raises(ValueError, match="not a timm VisionTransformer"): GetamSegmenter(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="out of range"):
        GetamSegmenter(tiny_backbone(depth=4), num_classes=4, hooks=[0, 1, 2, 9])
