"""Tests of getam.attribution: attention rollout, Chefer et al.'s generic attribution and LeGrad, batched over classes,
equal slow per-(image, class) references written plainly; rollout by hand; the cost is GETAM's."""
import pytest
import torch
from torch import nn

from fixtures import count_cost, tiny_backbone
from getam.attribution import (attention_rollout, chefer_attribution, every_block, legrad, legrad_scores,
                               rollout_matrix)
from getam.cams import present_ranks

LABELS = torch.tensor([[1., 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]])   # 3, 0 and 1 present classes
METHODS = (attention_rollout, chefer_attribution, legrad)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def forward_keeping(model, x, layers):
    """A fresh forward of `x` with hooks of our own: the logits, and per block of `layers` its post-softmax attention
    [1, heads, N, N] and its output tokens [1, N, D]."""
    attn, tokens = {}, {}
    hooks = [model.blocks[i].attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: attn.__setitem__(i, o))
             for i in layers]
    hooks += [model.blocks[i].register_forward_hook(lambda m, a, o, i=i: tokens.__setitem__(i, o)) for i in layers]
    flags = [blk.attn.fused_attn for blk in model.blocks]
    for blk in model.blocks:
        blk.attn.fused_attn = False
    try:
        out = model(x)
    finally:
        for hk in hooks:
            hk.remove()
        for blk, f in zip(model.blocks, flags):
            blk.attn.fused_attn = f
    out = (out[0] + out[1]) / 2 if isinstance(out, tuple) else out
    return out, [attn[i] for i in layers], [tokens[i] for i in layers]


def slow_reference(method, model, images, labels, layers, pool="mean"):
    """Per image and present class: a fresh forward of that image alone, `torch.autograd.grad` of the class score,
    and the method's definition in float64, one matrix product at a time."""
    p, (H, W) = model.num_prefix_tokens, images.shape[-2:]
    maps = torch.zeros(*labels.shape, (H // 8) * (W // 8), dtype=torch.float64)
    for b in range(len(images)):
        for c in torch.nonzero(labels[b] > 0).flatten().tolist():
            out, attn, tokens = forward_keeping(model, images[b:b + 1], layers)
            N = attn[0].shape[-1]
            eye = torch.eye(N, dtype=torch.float64)
            if method == "rollout":
                R = eye
                for A in attn:
                    M = 0.5 * A[0].detach().double().mean(0) + 0.5 * eye
                    R = (M / M.sum(-1, keepdim=True)) @ R
                maps[b, c] = R[0, p:]
            elif method == "chefer":
                grads = torch.autograd.grad(out[0, c], attn)
                R = eye
                for A, G in zip(attn, grads):
                    R = R + (G[0].double() * A[0].detach().double()).clamp(min=0).mean(0) @ R
                maps[b, c] = R[0, p:]
            else:  # legrad: per block, the class score of that block's tokens, differentiated w.r.t. its attention
                for A, z in zip(attn, tokens):
                    pooled = z.mean(1) if pool == "mean" else z[:, 0]
                    feats = model.fc_norm(model.norm(pooled))
                    s = (model.head(feats) + model.head_dist(feats)) / 2 if hasattr(model, "head_dist") \
                        else model.head(feats)
                    (G,) = torch.autograd.grad(s[0, c], A, retain_graph=True)
                    maps[b, c] += G[0].double().clamp(min=0).mean(0).mean(0)[p:]
    model.zero_grad(set_to_none=True)
    return maps.view(*labels.shape, H // 8, W // 8).float()


OURS = {"rollout": attention_rollout, "chefer": chefer_attribution, "legrad": legrad}


@pytest.mark.parametrize("method", ["rollout", "chefer", "legrad"])
@pytest.mark.parametrize("kind,depth", [("vit", 3), ("deit_distilled", 3), ("vit_hybrid", 4), ("vit_reg", 3)])
def test_equals_slow_reference_every_block_by_default(method, kind, depth):
    """The batched maps = the per-(image, class) reference over *every* block (the hybrid's GETAM default is the last
    half; these methods use all), on a batch whose images have 3, 0 and 1 classes, at two input sizes."""
    torch.manual_seed(0)
    model = tiny_backbone(kind, depth=depth).eval()
    for size in [(32, 32), (48, 40)]:
        x = torch.randn(3, 3, *size)
        ours = OURS[method](model, x, LABELS)
        ref = slow_reference(method, model, x, LABELS, list(range(depth)))
        assert ours.shape == (3, 4, size[0] // 8, size[1] // 8) and ref.norm() > 0
        assert rel_err(ours, ref) <= 1e-4
        assert ours[LABELS == 0].abs().sum() == 0


@pytest.mark.parametrize("method", ["rollout", "chefer", "legrad"])
@pytest.mark.parametrize("kind", ["eva", "beit", "clip", "deit3", "relpos"])
def test_other_families_and_chosen_layers_equal_reference(method, kind):
    torch.manual_seed(0)
    model = tiny_backbone(kind).eval()
    x = torch.randn(3, 3, 32, 32)
    assert rel_err(OURS[method](model, x, LABELS), slow_reference(method, model, x, LABELS, [0, 1, 2])) <= 1e-4
    assert rel_err(OURS[method](model, x, LABELS, layers=[2, 0]),
                   slow_reference(method, model, x, LABELS, [0, 2])) <= 1e-4


@pytest.mark.parametrize("kind", ["vit", "deit_distilled", "vit_reg"])
def test_legrad_class_token_pool_equals_reference(kind):
    torch.manual_seed(0)
    model = tiny_backbone(kind).eval()
    x = torch.randn(3, 3, 32, 40)
    ref = slow_reference("legrad", model, x, LABELS, [0, 1, 2], pool="token")
    assert rel_err(legrad(model, x, LABELS, pool="token"), ref) <= 1e-4
    assert rel_err(legrad(model, x, LABELS), ref) > 1e-2          # the two read-outs are different methods


def test_legrad_token_pool_at_the_last_block_is_the_logit():
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    x = torch.randn(2, 3, 32, 32)
    _, _, (z,) = forward_keeping(model, x, [2])
    with torch.no_grad():
        torch.testing.assert_close(legrad_scores(z, model, "token"), model(x))
        torch.testing.assert_close(legrad_scores(z, model), model.head(model.norm(z.mean(1))))


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_one_image_at_a_time(method):
    "Images with 3, 0 and 1 present classes in one batch: each image's maps are those it gets alone."
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    x = torch.randn(3, 3, 32, 32)
    batched = method(model, x, LABELS)
    alone = torch.cat([method(model, x[b:b + 1], LABELS[b:b + 1]) for b in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-7)
    assert ((batched.flatten(2).amax(-1) > 0) == (LABELS > 0)).all()


def uniform_attention_vit(kind="vit", depth=3):
    "A tiny ViT whose query and key projections are zero: every block's attention is uniform, 1/N."
    torch.manual_seed(0)
    model = tiny_backbone(kind, depth=depth).eval()
    with torch.no_grad():
        for blk in model.blocks:
            D = blk.attn.qkv.in_features
            blk.attn.qkv.weight[:2 * D] = 0
            blk.attn.qkv.bias[:2 * D] = 0
    return model


@pytest.mark.parametrize("kind,depth", [("vit", 3), ("vit_reg", 2)])
def test_rollout_of_uniform_attention_by_hand(kind, depth):
    """(U/2 + I/2)^L = (1 - 2^-L) U + 2^-L I for U = 11ᵀ/N: the [class] row gives every patch (1 - 2^-L)/N, whatever
    the image, for every requested class."""
    model = uniform_attention_vit(kind, depth)
    x = torch.randn(2, 3, 32, 32)
    N = model.num_prefix_tokens + 16
    maps = attention_rollout(model, x, torch.tensor([[1., 0, 1, 0], [0, 0, 0, 1]]))
    expected = torch.full((4, 4), (1 - 0.5 ** depth) / N)
    for b, c in [(0, 0), (0, 2), (1, 3)]:
        torch.testing.assert_close(maps[b, c], expected)
    assert maps[0, 1].abs().sum() == maps[1, 0].abs().sum() == 0


def test_rollout_matrix_by_hand():
    N = 4
    eye = torch.eye(N).expand(1, 3, N, N)
    torch.testing.assert_close(rollout_matrix([eye, eye]), torch.eye(N)[None])          # attending to oneself: R = I
    A = torch.zeros(1, 1, N, N)
    A[0, 0, :, 1] = 1                                                                     # everyone attends to token 1
    # Â = (A + I) / 2; row 0 of Â is (1/2, 1/2, 0, 0); of Â² it is (1/4, 3/4, 0, 0)
    torch.testing.assert_close(rollout_matrix([A])[0, 0], torch.tensor([.5, .5, 0, 0]))
    torch.testing.assert_close(rollout_matrix([A, A])[0, 0], torch.tensor([.25, .75, 0, 0]))
    # rows that do not sum to 1 are renormalised: 2A gives Â = (2A + I) / 2, rows / 1.5
    torch.testing.assert_close(rollout_matrix([2 * A])[0, 0], torch.tensor([1 / 3, 2 / 3, 0, 0]))


def test_chefer_with_no_value_signal_is_the_identity():
    "V = 0: the logits do not depend on the attention, ∇A = 0, R stays I and every map is zero."
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    with torch.no_grad():
        for blk in model.blocks:
            D = blk.attn.qkv.in_features
            blk.attn.qkv.weight[2 * D:] = 0
            blk.attn.qkv.bias[2 * D:] = 0
    maps = chefer_attribution(model, torch.randn(2, 3, 32, 32), LABELS[:2])
    assert maps.shape == (2, 4, 4, 4) and maps.abs().sum() == 0


def test_cost_one_forward_and_attention_only_vjps(monkeypatch):
    """Rollout: one forward, no VJP. Chefer: one forward, max_b K_b VJPs w.r.t. all L attention maps. LeGrad: one
    forward, max_b K_b VJPs per block, each w.r.t. that block's attention. Never parameter gradients."""
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([[1., 1, 1, 0], [1., 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]])   # sum K = 6, max K = 3
    calls, forwards = count_cost(monkeypatch, model)
    expected = {attention_rollout: [], chefer_attribution: [3] * 3, legrad: [1] * 9}
    for method, vjps in expected.items():
        calls.clear()
        forwards.clear()
        method(model, x, y)
        assert calls == vjps and forwards == [1], method.__name__
    assert all(p.grad is None for p in model.parameters())
    assert len(present_ranks(y)) == 3


def test_model_left_unchanged_and_frozen_or_wrapped_models_work():
    torch.manual_seed(0)
    model = tiny_backbone("vit_hybrid").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    maps = {m: m(model, x, LABELS[:2]) for m in METHODS}
    assert hooks == 0 and sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert [b.attn.fused_attn for b in model.blocks] == [True] * 3
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    for p in model.parameters():
        p.requires_grad_(False)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = model

        def forward(self, t):
            return self.backbone(t)

    with torch.no_grad():   # the methods turn grad on themselves where they need it
        for m in METHODS:
            torch.testing.assert_close(m(Wrapped(), x, LABELS[:2]), maps[m])


@pytest.mark.parametrize("method", METHODS)
def test_labels_as_indices_and_top_k(method):
    torch.manual_seed(0)
    model = tiny_backbone("vit").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).indices
    multi_hot = torch.zeros(3, 4).scatter_(1, top2, 1.)
    torch.testing.assert_close(method(model, x, top_k=2), method(model, x, multi_hot))
    torch.testing.assert_close(method(model, x, [[0, 2, 3], [], 1]), method(model, x, LABELS))


@pytest.mark.parametrize("kind,kw", [("vit", dict(class_token=False, global_pool="avg")),
                                     ("eva", dict(global_pool="avg"))])
def test_no_class_token_readout_is_refused(kind, kw):
    "Rollout and Chefer read row 0 of the attention: on a model whose head never reads it, a clear error."
    torch.manual_seed(0)
    model = tiny_backbone(kind, **kw).eval()
    x, y = torch.randn(1, 3, 32, 32), torch.tensor([[1., 0, 0, 0]])
    for fn in (attention_rollout, chefer_attribution, lambda *a: legrad(*a, pool="token")):
        with pytest.raises(ValueError, match=f"global_pool='{kw['global_pool']}'"):
            fn(model, x, y)


def test_legrad_is_timm_only_and_says_so():
    with pytest.raises(TypeError, match="legrad needs the tokens after every block and the final norm of a timm ViT"):
        legrad(nn.Linear(3, 4), torch.randn(1, 3), [0])
    with pytest.raises(ValueError, match="pool='max'; expected one of mean, token"):
        legrad(tiny_backbone("vit").eval(), torch.randn(1, 3, 32, 32), [0], pool="max")


def test_every_block():
    assert every_block(tiny_backbone("vit_hybrid", depth=6)) == [0, 1, 2, 3, 4, 5]
