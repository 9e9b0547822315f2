"""Tests of getam.cams: GETAM equals a slow per-(image, class) reference, the cost model holds,
the baselines are what Sec. 3 / Table 1 say."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixtures import count_cost, tiny_backbone
from getam.backbones import create_backbone
from getam.repro.reference import benchmark_cams
from getam.cams import (att_gradients, cam_add, cam_ignore, cnn_cam, getam, getam_layers, grad_cam, maps_from_attention,
                        normalize_maps, present_ranks, resize_maps, target_labels, ts_cam)
from getam.backbones import record_attention

def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def slow_reference(model, images, labels, layers, fusion="sum"):
    """The released recipe, independently written: per (image, present class) a fresh forward of that image alone,
    attention kept with retain_grad, a plain loss.backward() (parameter gradients and all), then Eq. 2 per block."""
    p = model.num_prefix_tokens
    maps = None
    for b in range(len(images)):
        for c in torch.nonzero(labels[b] > 0).flatten().tolist():
            saved = {}
            hooks = [model.blocks[i].attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: saved.__setitem__(i, o))
                     for i in layers]
            flags = [blk.attn.fused_attn for blk in model.blocks]
            for blk in model.blocks:
                blk.attn.fused_attn = False
            try:
                x = images[b:b + 1]
                tokens = model.patch_embed(x)   # NHWC with dynamic_img_size; else [1, N, D] on the fixed grid
                h, w = tokens.shape[1:3] if tokens.ndim == 4 else model.patch_embed.grid_size
                out = model(x)
                out = (out[0] + out[1]) / 2 if isinstance(out, tuple) else out
                for a in saved.values():
                    a.retain_grad()
                model.zero_grad()
                out[0, c].backward()
            finally:
                for hk in hooks:
                    hk.remove()
                for blk, f in zip(model.blocks, flags):
                    blk.attn.fused_attn = f
            if maps is None:
                maps = torch.zeros(*labels.shape, h * w, dtype=torch.float64)
            per_layer, mats = [], []
            for i in layers:
                A, G = saved[i][0].double(), saved[i].grad[0].double()   # [heads, N, N]
                M = torch.stack([(G[k] * A[k]).clamp(min=0) for k in range(len(A))]).mean(0) * \
                    torch.stack([G[k].clamp(min=0) for k in range(len(A))]).mean(0)
                per_layer.append(M[0, p:])
                mats.append(M)
            if fusion == "sum":
                maps[b, c] = sum(per_layer)
            elif fusion == "product":
                maps[b, c] = torch.stack([m / m.max() for m in per_layer]).prod(0)
            else:  # rollout
                R = torch.eye(mats[0].shape[0], dtype=torch.float64)
                for M in mats:
                    M = M / M.sum(-1, keepdim=True)
                    R = 0.5 * (M + torch.eye(len(M), dtype=torch.float64)) @ R
                maps[b, c] = R[0, p:]
    model.zero_grad(set_to_none=True)
    return maps.view(*labels.shape, h, w).float()


LABELS = torch.tensor([[1., 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]])


@pytest.mark.parametrize("kind,depth,layers", [("vit", 3, [0, 1, 2]), ("deit_distilled", 3, [0, 1, 2]),
                                               ("vit_hybrid", 8, [4, 5, 6, 7])])
@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_getam_equals_slow_reference(kind, depth, layers, size):
    torch.manual_seed(0)
    model = tiny_backbone(kind, depth=depth).eval()
    x = torch.randn(3, 3, *size)
    ours = getam(model, x, LABELS)                      # default layers: all, the last half for the hybrid
    ref = slow_reference(model, x, LABELS, layers)
    assert ours.shape == (3, 4, size[0] // 8, size[1] // 8) and ours.dtype == torch.float32 and not ours.requires_grad
    assert rel_err(ours, ref) <= 1e-4
    assert ours[1].abs().sum() == 0 and ours[LABELS == 0].abs().sum() == 0   # no label → zero maps
    assert (ours.flatten(2).amax(-1)[LABELS > 0] > 0).all()


@pytest.mark.parametrize("fusion", ["sum", "product", "matmul"])
@pytest.mark.parametrize("kind", ["vit", "deit_distilled"])
def test_fusion_and_layers_equal_reference(fusion, kind):
    torch.manual_seed(1)
    model = tiny_backbone(kind, depth=4).eval()
    x = torch.randn(3, 3, 40, 32)
    for layers in ([1, 3], [-1]):
        idx = [i % 4 for i in layers]
        ours = getam(model, x, LABELS, layers=layers, fusion=fusion)
        assert rel_err(ours, slow_reference(model, x, LABELS, idx, fusion)) <= 1e-4


def test_getam_layers_ingredients():
    torch.manual_seed(2)
    model = tiny_backbone("deit_distilled", depth=3).eval()
    x = torch.randn(3, 3, 32, 40)
    r = getam_layers(model, x, LABELS)
    assert (r.per_layer.shape == (3, 3, 4, 4, 5) and r.a_cls.shape == (3, 3, 4, 5)
            and r.grad_cls.shape == (3, 3, 4, 4, 5))
    torch.testing.assert_close(r.maps, getam(model, x, LABELS))
    torch.testing.assert_close(r.per_layer.sum(0), r.maps)
    for i in range(3):
        torch.testing.assert_close(r.per_layer[i], getam(model, x, LABELS, layers=[i]))
    # A_CLS is a distribution over tokens restricted to patches: positive, sums to < 1 (prefix columns dropped)
    s = r.a_cls.sum((-2, -1))
    assert (r.a_cls > 0).all() and (s < 1).all()
    assert r.grad_cls[:, LABELS == 0].abs().sum() == 0
    torch.testing.assert_close(r.logits, model(x).detach())


def test_single_head_ingredients_give_eq2():
    torch.manual_seed(3)
    model = tiny_backbone("vit", num_heads=1).eval()
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1., 1, 0, 0], [0, 0, 0, 1]])
    r = getam_layers(model, x, y)
    # one head: GETAM^i_c = ReLU(∇A ⊙ A) ⊙ ReLU(∇A) = A ⊙ ReLU(∇A)^2
    torch.testing.assert_close(r.per_layer, r.a_cls[:, :, None] * F.relu(r.grad_cls) ** 2)
    torch.testing.assert_close(att_gradients(model, x, y, layers=[2]),
                               r.a_cls[2][:, None] * F.relu(r.grad_cls[2]) * (y > 0)[..., None, None])


def test_cost_one_forward_maxk_vjps_no_param_grads(monkeypatch):
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([[1., 1, 1, 0], [1., 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]])   # sum K = 6, max K = 3
    calls, forwards = count_cost(monkeypatch, model)
    getam(model, x, y)
    assert calls == [3, 3, 3] and forwards == [1]
    assert all(p.grad is None for p in model.parameters())
    assert present_ranks(y)[2][0].tolist() == [0]


def test_model_left_unchanged():
    torch.manual_seed(0)
    model = tiny_backbone("vit_hybrid").eval()
    x = torch.randn(2, 3, 32, 32)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    for f in ("sum", "product", "matmul"):
        getam_layers(model, x, LABELS[:2], fusion=f)
    grad_cam(model, x, LABELS[:2])
    att_gradients(model, x, LABELS[:2])
    ts_cam(model, x, LABELS[:2])
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert [b.attn.fused_attn for b in model.blocks] == [True] * 3 and not model.training
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks == 0
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_maps_from_attention_keeps_graph_for_training_loss():
    "Training reuses its forward: maps with retain_graph=True, then the loss backward gives the plain gradients."
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1., 0, 1, 0], [0, 1, 0, 0]])
    with record_attention(model) as rec:
        logits = model(x)
        maps = maps_from_attention(logits, rec.attn, y, rec.grid, rec.num_prefix_tokens, retain_graph=True)
        assert not maps.requires_grad
        F.multilabel_soft_margin_loss(logits, y).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.multilabel_soft_margin_loss(model(x), y).backward()
    for a, b in zip(g1, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(maps, getam(model, x, y))


def test_frozen_and_wrapped_models_and_no_grad_context():
    torch.manual_seed(0)
    vit = tiny_backbone("deit_distilled").eval()
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1., 0, 1, 0], [0, 1, 0, 0]])
    ref = getam(vit, x, y)

    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = vit

        def forward(self, x): return self.backbone(x)

    vit.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(getam(TwoBranch(), x, y), ref)
    # (head, head_dist) pair in training mode → averaged
    vit.distilled_training = True
    vit.train()
    for m in vit.modules():
        if isinstance(m, nn.Dropout): assert m.p == 0
    torch.testing.assert_close(getam(vit, x, y), ref)


def test_autocast_bf16_close_to_float32():
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1., 0, 1, 0], [0, 1, 0, 0]])
    ref = getam(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = getam(model, x, y)
    assert amp.dtype == torch.float32
    assert rel_err(amp, ref) < 0.1


def test_bad_inputs_are_named():
    model = tiny_backbone("vit").eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="expected one of sum, product, matmul"):
        getam(model, x, torch.ones(1, 4), fusion="max")
    with pytest.raises(ValueError, match="do not match logits"):
        getam(model, x, torch.ones(1, 5))
    with record_attention(model) as rec, torch.no_grad():
        logits = model(x)
    with pytest.raises(RuntimeError, match="autograd graph"):
        maps_from_attention(logits, rec.attn, torch.ones(1, 4), rec.grid, 1)
    with pytest.raises(ValueError, match="prefix"):
        maps_from_attention(logits, rec.attn, torch.ones(1, 4), (3, 3), 1)
    assert getam(model, x, torch.zeros(1, 4)).abs().sum() == 0


# ---------------------------------------------------------------- baselines

def test_cam_ignore_is_the_classifier_per_token():
    torch.manual_seed(0)
    for kind in ("vit", "deit_distilled"):
        model = tiny_backbone(kind).eval()
        x, y = torch.randn(2, 3, 32, 40), torch.tensor([[1., 1, 0, 1], [0, 1, 1, 1]])
        with torch.no_grad():
            O = model.forward_features(x)
            p = model.num_prefix_tokens
            heads = [model.head] + ([model.head_dist] if kind == "deit_distilled" else [])
            per_token = sum(h(O[:, p:]) for h in heads) / len(heads)             # [B, n, C]
        want = per_token.transpose(1, 2).reshape(2, 4, 4, 5) * y[..., None, None]
        torch.testing.assert_close(cam_ignore(model, x, y, relu=False), want)
        torch.testing.assert_close(cam_ignore(model, x, y), F.relu(want))
        add = sum(h(O[:, p:] + O[:, :1]) for h in heads) / len(heads)
        torch.testing.assert_close(cam_add(model, x, y, relu=False),
                                   add.transpose(1, 2).reshape(2, 4, 4, 5) * y[..., None, None])


def test_cam_mean_is_the_logit_for_avg_pooling():
    torch.manual_seed(0)
    model = tiny_backbone("vit", global_pool="avg", fc_norm=False).eval()
    x, y = torch.randn(2, 3, 40, 32), torch.ones(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(cam_ignore(model, x, y, relu=False).mean((-2, -1)), model(x), rtol=1e-5, atol=1e-5)


def test_grad_cam_by_hand():
    "Last block a pass-through, no final norm, average pooling: ∂y_c/∂O_t = θ_c / n, so Grad-CAM = ReLU(θ_c·O_t) / n."
    torch.manual_seed(0)
    model = tiny_backbone("vit", global_pool="avg", fc_norm=False).eval()
    model.norm = nn.Identity()
    with torch.no_grad():   # the last block passes its input through: O entering it = O leaving it
        for w in (model.blocks[-1].attn.proj, model.blocks[-1].mlp.fc2):
            w.weight.zero_()
            w.bias.zero_()
    x, y = torch.randn(2, 3, 32, 40), torch.tensor([[1., 0, 0, 1], [0, 1, 1, 0]])
    with torch.no_grad():
        O = model.forward_features(x)[:, 1:]
    want = F.relu(torch.einsum("bnd,cd->bcn", O, model.head.weight)) / 20 * y[..., None]
    torch.testing.assert_close(grad_cam(model, x, y), want.view(2, 4, 4, 5), rtol=1e-5, atol=1e-7)


def test_att_gradients_and_getam_with_one_head():
    "One head: ReLU(G⊙A) = A·ReLU(G), so per block GETAM = AttGrad² / A_CLS."
    torch.manual_seed(0)
    model = tiny_backbone("vit", num_heads=1).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([[1., 0, 1, 0], [0, 1, 0, 0]])
    r = getam_layers(model, x, y, layers=[1])
    ag = att_gradients(model, x, y, layers=[1])
    torch.testing.assert_close(r.maps, ag ** 2 / r.a_cls[0][:, None], rtol=1e-5, atol=1e-12)
    # and summing over blocks is the default
    torch.testing.assert_close(att_gradients(model, x, y),
                               sum(att_gradients(model, x, y, layers=[i]) for i in range(3)))


def test_ts_cam_is_layer_mean_attention_times_token_cam():
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([[1., 0, 1, 0], [0, 1, 0, 0]])
    with record_attention(model) as rec, torch.no_grad():
        model(x)
    a = torch.stack([t[:, :, 0, 1:].mean(1) for t in rec.attn]).mean(0).view(2, 1, 4, 4)
    torch.testing.assert_close(ts_cam(model, x, y), F.relu(cam_ignore(model, x, y, relu=False) * a))


def test_cnn_cam_mean_plus_bias_is_the_logit():
    torch.manual_seed(0)
    model = create_backbone("resnet18", num_classes=3).eval()
    x, y = torch.randn(2, 3, 64, 96), torch.ones(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(cnn_cam(model, x, y, relu=False).mean((-2, -1)) + model.fc.bias, model(x),
                                   rtol=1e-4, atol=1e-5)
    m = cnn_cam(model, x, torch.tensor([[1., 0, 0], [0, 0, 1]]))
    assert m.shape == (2, 3, 2, 3) and m[0, 1:].abs().sum() == 0 and (m >= 0).all()
    with pytest.raises(TypeError, match="nn.Linear"):
        cnn_cam(tiny_backbone("vit", num_classes=0), x, y)


def test_normalize_and_resize():
    m = torch.tensor([[[[0., 2], [1, 4]], [[0, 0], [0, 0]], [[0, 0], [0, 1e-30]]]])
    torch.testing.assert_close(normalize_maps(m),
                               torch.tensor([[[[0., .5], [.25, 1]], [[0, 0], [0, 0]], [[0, 0], [0, 1]]]]))
    r = resize_maps(torch.arange(4.).view(1, 1, 2, 2), (4, 4))
    assert r.shape == (1, 1, 4, 4) and r[0, 0, 0, 0] == 0 and r[0, 0, -1, -1] == 3
    torch.testing.assert_close(r[0, 0, 1, 1], torch.tensor(0.75))   # bilinear, align_corners=False


def test_benchmark_smoke(capsys):
    t = benchmark_cams(repeats=1, name="vit_tiny_patch16_224", size=32, ks=(2, 1), num_classes=3, depth=1)
    assert list(t) == ["(a) released", "(b) getam", "(c) floor"]
    out = capsys.readouterr().out
    assert "relative difference of the maps (a) vs (b)" in out and "speed-up" in out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "vit_hybrid", "deit", "deit_distilled"])
def test_paper_architectures_equal_reference(name):
    "The real four architectures (random weights, 2 blocks, 96 px) against the slow reference."
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=4, depth=2).eval()
    x, y = torch.randn(2, 3, 96, 64), torch.tensor([[1., 0, 1, 0], [0, 0, 0, 1]])
    ours = getam(model, x, y)
    assert ours.shape == (2, 4, 6, 4)
    assert rel_err(ours, slow_reference(model, x, y, [1] if name == "vit_hybrid" else [0, 1])) <= 1e-4


def test_grad_cam_not_zero_for_class_token_models():
    "The patch tokens leaving the last block do not reach a [class]-token head; Grad-CAM must look where they do."
    torch.manual_seed(0)
    for kind in ("vit", "deit_distilled", "vit_hybrid"):
        model = tiny_backbone(kind).eval()
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([[1., 0, 1, 0], [0, 1, 0, 0]])
        m = grad_cam(model, x, y, relu=False)
        assert (m.abs().flatten(2).amax(-1) > 0).eq(y > 0).all()


# ---------------------------------------------------------------- every timm family; models without a [class] read-out

@pytest.mark.parametrize("kind", ["vit_reg", "clip", "deit3", "eva", "beit", "relpos"])
def test_getam_every_family_equals_slow_reference(kind):
    """Registers (p = 5), CLIP, DeiT III, EVA-02 (RoPE), BEiT (relative bias), ViT-RelPos: the batched maps = per
    (image, class) autograd."""
    torch.manual_seed(0)
    model = tiny_backbone(kind).eval()
    sizes = [(32, 32), (48, 40)] if getattr(model, "dynamic_img_size", False) else [(32, 32)]
    for size in sizes:
        x = torch.randn(3, 3, *size)
        ref = slow_reference(model, x, LABELS, [0, 1, 2])
        ours = getam(model, x, LABELS)
        assert ours.shape == (3, 4, size[0] // 8, size[1] // 8)
        assert rel_err(ours, ref) <= 1e-4 and ref.norm() > 0
        r = getam_layers(model, x, LABELS, layers=[0, 2])
        assert rel_err(r.maps, slow_reference(model, x, LABELS, [0, 2])) <= 1e-4
        assert rel_err(r.per_layer[1], slow_reference(model, x, LABELS, [2])) <= 1e-4
    assert [b.attn.fused_attn for b in model.blocks] == [True] * 3


@pytest.mark.parametrize("kind", ["eva", "beit"])
def test_att_gradients_every_family_one_head(kind):
    "One head: per block GETAM = AttGrad² / A_CLS holds on the other families too."
    torch.manual_seed(0)
    model = tiny_backbone(kind, num_heads=1).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([[1., 0, 1, 0], [0, 1, 0, 0]])
    r = getam_layers(model, x, y, layers=[1])
    torch.testing.assert_close(r.maps, att_gradients(model, x, y, layers=[1]) ** 2 / r.a_cls[0][:, None],
                               rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("kind,kw", [("vit", dict(class_token=False, global_pool="avg")),    # GAP ViT: row 0 is a patch
                                     # attention pool
                                     ("vit", dict(class_token=False, global_pool="map", reg_tokens=1)),
                                     ("eva", dict(global_pool="avg")), ("beit", dict(global_pool="avg")),
                                     ("relpos", dict(class_token=False, global_pool="avg"))])
def test_no_class_token_readout_is_refused_never_silent(kind, kw):
    torch.manual_seed(0)
    model = tiny_backbone(kind, **kw).eval()
    x, y = torch.randn(1, 3, 32, 32), torch.tensor([[1., 0, 0, 0]])
    name = type(model).__name__
    for fn in (getam, getam_layers, att_gradients):
        with pytest.raises(ValueError, match=f"{name} has global_pool='{kw['global_pool']}'"):
            fn(model, x, y)
    assert grad_cam(model, x, y).shape == (1, 4, 4, 4)    # token features: no [class] row needed


def test_labels_as_indices_topk_and_multihot_agree():
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    top2 = logits.topk(2, 1).indices
    want = getam(model, x, torch.zeros(3, 4).scatter_(1, top2, 1.))
    assert want.flatten(2).amax(-1).gt(0).sum() == 6
    torch.testing.assert_close(getam(model, x, top_k=2), want)
    torch.testing.assert_close(getam(model, x, top2), want)
    torch.testing.assert_close(getam(model, x, top2.tolist()), want)
    torch.testing.assert_close(att_gradients(model, x, None, top_k=2), att_gradients(model, x, top2))
    torch.testing.assert_close(grad_cam(model, x, top2[:, 0]), grad_cam(model, x, F.one_hot(top2[:, 0], 4).float()))
    one = getam(model, x)                      # labels=None: the top-1 class only
    assert one.flatten(2).amax(-1).gt(0).sum(1).tolist() == [1, 1, 1]
    assert torch.equal(one.flatten(2).amax(-1).argmax(1), logits.argmax(1))
    ragged = getam(model, x, [[0, 3], 1, []])
    torch.testing.assert_close(ragged, getam(model, x, torch.tensor([[1., 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]])))
    with pytest.raises(ValueError, match="ambiguous"):
        getam(model, x, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        getam(model, x, torch.tensor([0, 1, 4]))
    out = getam(model, x)
    assert torch.is_tensor(out) and out.device == x.device and out.dtype == torch.float32


def test_target_labels_by_hand():
    logits = torch.tensor([[0., 3, 1, 2], [5, -1, 0, 4]])
    assert target_labels(None, logits, top_k=3).tolist() == [[0., 1, 1, 1], [1, 0, 1, 1]]
    assert target_labels(torch.tensor([[2, 2], [3, -1]]), logits).tolist() == [[0., 0, 1, 0], [0, 0, 0, 1]]
    assert (target_labels(torch.tensor([[True, False, False, True], [False] * 4]), logits).tolist()
            == [[1., 0, 0, 1], [0] * 4])
    with pytest.raises(ValueError, match="one per image"):
        target_labels([[0], [1], [2]], logits)
