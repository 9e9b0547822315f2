"""Tests of getam.backbones: the paper's timm backbones, offline weights,
attention recording that leaves the model untouched."""
import pytest
import torch
from torch import nn

import torch.nn.functional as F

from fixtures import TINY_KINDS, tiny_backbone
from getam.backbones import (ALIASES, check_class_token_readout, create_backbone, default_layers, is_hybrid,
                             load_weights_file, record_attention, resolve_layers, resolve_name, vit_of,
                             find_weights, weights_candidates)

FAMILIES = ["vit", "deit_distilled", "vit_hybrid"]


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_aliases_are_the_papers_models():
    assert {k: resolve_name(k) for k in ALIASES} == {
        "vit": "vit_base_patch16_384", "vit_hybrid": "vit_base_r50_s16_384",
        "deit": "deit_base_patch16_384", "deit_distilled": "deit_base_distilled_patch16_384"}
    with pytest.raises(ValueError, match="vit_hybrid"):
        resolve_name("vit_hybird")


@pytest.mark.parametrize("name,prefix,hybrid", [("vit", 1, False), ("vit_hybrid", 1, True), ("deit", 1, False),
                                                ("deit_distilled", 2, False)])
def test_paper_backbones_build_offline_any_size(name, prefix, hybrid):
    torch.manual_seed(0)
    m = create_backbone(name, num_classes=5, depth=1).eval()
    assert m.num_prefix_tokens == prefix and is_hybrid(m) == hybrid
    assert m.dynamic_img_size
    with record_attention(m) as rec, torch.no_grad():
        out = m(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 5)
    assert rec.grid == (4, 6)  # stride 16 for all four
    assert rec.attn[0].shape == (1, m.blocks[0].attn.num_heads, prefix + 24, prefix + 24)


def test_default_layers_last_half_for_hybrid():
    assert default_layers(tiny_backbone("vit", depth=12)) == list(range(12))
    assert default_layers(tiny_backbone("deit_distilled", depth=12)) == list(range(12))
    assert default_layers(tiny_backbone("vit_hybrid", depth=12)) == list(range(6, 12))
    assert default_layers(tiny_backbone("vit_hybrid", depth=6)) == [3, 4, 5]
    assert resolve_layers(tiny_backbone("vit", depth=4), [-1, 1, 1]) == [1, 3]
    with pytest.raises(ValueError, match="0..3"):
        resolve_layers(tiny_backbone("vit", depth=4), [4])


def test_resnet_for_cnn_cam():
    m = create_backbone("resnet18", num_classes=3).eval()
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(TypeError, match="VisionTransformer"):
        vit_of(m)


def test_local_weights_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    src = create_backbone("vit_tiny_patch16_224", num_classes=5, depth=2)
    save_file(src.state_dict(), str(tmp_path / "vit_tiny_patch16_224.safetensors"))
    a = create_backbone("vit_tiny_patch16_224", pretrained=True, num_classes=5, depth=2, weights_dir=tmp_path)
    for k, v in src.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k
    # a wrapped torch checkpoint with DDP prefixes, passed explicitly; the head does not fit 3 classes → new head
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ck.pth")
    b = create_backbone("vit_tiny_patch16_224", weights=tmp_path / "ck.pth", num_classes=3, depth=2)
    assert torch.equal(b.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    assert b.head.weight.shape == (3, 192)
    # position embeddings of another size are resampled by timm's filter
    c = create_backbone("vit_tiny_patch16_224", weights=tmp_path / "ck.pth", num_classes=5, depth=2, img_size=64)
    assert c.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(c.pos_embed[:, 0], src.pos_embed[:, 0])


def test_missing_weights_error_names_paths_and_key(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        create_backbone("vit_hybrid", pretrained=True, weights_dir=tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path / "vit_base_r50_s16_384.safetensors") in msg and str(tmp_path / "vit_hybrid.pth") in msg
    assert "weights_dir" in msg
    assert weights_candidates("vit", tmp_path)[0] == tmp_path / "vit_base_patch16_384.safetensors"
    arch = dict(patch_size=16, embed_dim=64, depth=6, num_heads=2)
    assert find_weights("vit_hybrid", tmp_path) is None                 # nothing there, and getam ships no ViT-Hybrid-B
    shipped = find_weights("vit_tiny_patch16_224", tmp_path, arch)
    assert shipped.name == "vit_tiny_patch16_224-p16-w64-d6-h2.safetensors" and shipped.parent.name == "weights"
    (tmp_path / "vit_tiny_patch16_224-p16-w64-d6-h2.pth").touch()      # a file in weights_dir comes first
    assert find_weights("vit_tiny_patch16_224", tmp_path, arch) == tmp_path / "vit_tiny_patch16_224-p16-w64-d6-h2.pth"
    with pytest.raises(FileNotFoundError, match="weights_dir"):
        load_weights_file(tmp_path / "nope.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_weights_file(tmp_path / "list.pth")


def test_no_network_without_pretrained(monkeypatch):
    import timm
    seen = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: seen.append(k.get("pretrained")) or real(*a, **k))
    create_backbone("vit_tiny_patch16_224", num_classes=2, depth=1)
    assert seen == [False]


def manual_attention(block, x):
    "Post-softmax attention of a timm block computed by hand from the block input."
    a = block.attn
    B, N, C = x.shape
    qkv = a.qkv(block.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
    return ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_record_attention_is_the_attention(kind, size):
    torch.manual_seed(0)
    m = tiny_backbone(kind).eval()
    ins = {}
    hooks = [b.register_forward_pre_hook(lambda mod, a, i=i: ins.__setitem__(i, a[0])) for i, b in enumerate(m.blocks)]
    with record_attention(m, layers=[0, 2]) as rec:
        m(torch.randn(2, 3, *size))
        assert [b.attn.fused_attn for b in m.blocks] == [False, True, False]  # only recorded blocks unfused
    for h in hooks:
        h.remove()
    p = 2 if kind == "deit_distilled" else 1
    assert rec.num_prefix_tokens == p
    assert rec.grid == (size[0] // 8, size[1] // 8)
    assert len(rec.attn) == 2 and set(rec._attn) == {0, 2}
    for i, a in zip([0, 2], rec.attn):
        assert a.requires_grad and a.grad_fn is not None
        torch.testing.assert_close(a, manual_attention(m.blocks[i], ins[i]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", FAMILIES)
def test_model_restored_exactly(kind):
    torch.manual_seed(0)
    m = tiny_backbone(kind).eval()
    x = torch.randn(2, 3, 40, 48)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    flags, hooks = [b.attn.fused_attn for b in m.blocks], n_hooks(m)
    with torch.no_grad():
        before = m(x)
    with record_attention(m) as rec:
        m(x)
    with pytest.raises(ZeroDivisionError):  # restored on errors too
        with record_attention(m, [1]):
            1 / 0
    assert [b.attn.fused_attn for b in m.blocks] == flags == [True] * 3
    assert n_hooks(m) == hooks == 0
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    with torch.no_grad():
        assert torch.equal(m(x), before)
    # default blocks: the hybrid sums its last half (3 // 2 = 1 on)
    assert len(rec.attn) == (2 if kind == "vit_hybrid" else 3)


def test_recorder_keeps_last_forward_and_complains_before_any():
    m = tiny_backbone().eval()
    with record_attention(m, [1]) as rec:
        with pytest.raises(RuntimeError, match="run a forward"):
            rec.attn
        m(torch.randn(1, 3, 32, 32))
        m(torch.randn(1, 3, 48, 32))
    assert rec.grid == (6, 4) and rec.attn[0].shape[-1] == 1 + 24


def test_frozen_model_and_wrapped_backbone():
    torch.manual_seed(0)
    vit = tiny_backbone().eval().requires_grad_(False)

    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = vit

        def forward(self, x): return self.backbone(x)

    w = TwoBranch()
    assert vit_of(w) is vit and vit_of(vit) is vit
    with record_attention(w) as rec:
        y = w(torch.randn(1, 3, 32, 32))
    assert all(a.requires_grad for a in rec.attn)  # a frozen model still gives attention in the graph
    g = torch.autograd.grad(y[0, 0], rec.attn)
    assert all(t.shape == a.shape for t, a in zip(g, rec.attn))
    with record_attention(w) as rec, torch.no_grad():
        w(torch.randn(1, 3, 32, 32))
    assert not rec.attn[0].requires_grad


def test_unsupported_block_is_named():
    m = tiny_backbone()
    m.blocks[1].attn = nn.Identity()
    with pytest.raises(TypeError, match="block 1"):
        with record_attention(m):
            pass
    assert m.blocks[0].attn.fused_attn  # nothing was changed


# ---------------------------------------------------------------- every timm family with a [class] read-out

OTHER_FAMILIES = ["vit_reg", "clip", "deit3", "eva", "beit", "relpos"]


def values_and_output(attn_module, x, A):
    "What the attention module outputs when its post-softmax attention is A: proj(norm(A @ V)), V from its own qkv."
    a = attn_module
    B, N, _ = x.shape
    bias = a.qkv.bias
    if bias is None and getattr(a, "q_bias", None) is not None:
        bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
    v = F.linear(x, a.qkv.weight, bias).reshape(B, N, 3, a.num_heads, -1)[:, :, 2].transpose(1, 2)
    out = (A @ v).transpose(1, 2).reshape(B, N, -1)
    return a.proj(getattr(a, "norm", nn.Identity())(out))


@pytest.mark.parametrize("kind", OTHER_FAMILIES)
def test_record_attention_every_family_is_the_mixing_matrix(kind):
    """For every family the recorded tensor is the post-softmax attention the module multiplies V with (rotary
    embedding / relative position bias included): rows are distributions and proj(A @ V) is the module's output."""
    torch.manual_seed(0)
    m = tiny_backbone(kind).eval()
    assert kind not in ("beit", "relpos") or m.blocks[0].attn.fused_attn   # the fused path is what is normally run
    io = {}
    hooks = [b.attn.register_forward_hook(lambda mod, a, o, i=i: io.__setitem__(i, (a[0], o)))
             for i, b in enumerate(m.blocks)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = m(x)
    with record_attention(m, [0, 2]) as rec:
        y = m(x)
    for h in hooks:
        h.remove()
    p = {"vit_reg": 5}.get(kind, 1)
    assert rec.num_prefix_tokens == p and rec.grid == (4, 4)
    for i, A in zip([0, 2], rec.attn):
        assert A.shape == (2, 2, p + 16, p + 16) and A.requires_grad
        torch.testing.assert_close(A.sum(-1), torch.ones(2, 2, p + 16))
        x_in, out = io[i]
        torch.testing.assert_close(values_and_output(m.blocks[i].attn, x_in, A), out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, fused, rtol=1e-5, atol=1e-6)    # the unfused path computes the same function
    assert all(b.attn.fused_attn == f for b, f in zip(m.blocks, [True] * 3)) and n_hooks(m) == 0


def test_eva_rope_is_in_the_recorded_attention():
    "With the rotary embedding switched off the attention changes: the recorded A is the one after RoPE."
    torch.manual_seed(0)
    m = tiny_backbone("eva").eval()
    x = torch.randn(1, 3, 40, 48)
    with record_attention(m, [0]) as rec, torch.no_grad():
        m(x)
    with_rope = rec.attn[0]
    m.rope = None   # Eva skips the rotary embedding when it has none
    with record_attention(m, [0]) as rec, torch.no_grad():
        m(x)
    assert rec.grid == (5, 6) and (with_rope - rec.attn[0]).abs().max() > 1e-3


def test_beit_relative_bias_is_in_the_recorded_attention():
    torch.manual_seed(0)
    m = tiny_backbone("beit").eval()
    x = torch.randn(1, 3, 32, 32)
    with record_attention(m, [1]) as rec, torch.no_grad():
        m(x)
    a0 = rec.attn[0]
    with torch.no_grad():
        m.blocks[1].attn.relative_position_bias_table.add_(torch.randn_like(m.blocks[1].attn.relative_position_bias_table))
    with record_attention(m, [1]) as rec, torch.no_grad():
        m(x)
    assert (a0 - rec.attn[0]).abs().max() > 1e-3


def test_tiny_kinds_build_and_run():
    for kind in TINY_KINDS:
        m = tiny_backbone(kind).eval()
        vit_of(m)
        check_class_token_readout(m)
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match="relpos"):
        tiny_backbone("swin")


@pytest.mark.parametrize("kind,kw,msg", [
    ("vit", dict(class_token=False, global_pool="avg"), "VisionTransformer has global_pool='avg' and no [class] token"),
    ("vit", dict(class_token=False, global_pool="map"), "VisionTransformer has global_pool='map' and no [class] token"),
    ("vit", dict(global_pool="avg"), "which this head never reads"),
    ("eva", dict(global_pool="avg"), "Eva has global_pool='avg' and a [class] token"),
    ("beit", dict(global_pool="avg"), "Beit has global_pool='avg'"),
    ("relpos", dict(class_token=False, global_pool="avg"),
     "VisionTransformerRelPos has global_pool='avg' and no [class] token"),
])
def test_no_class_token_readout_is_refused_with_the_reason(kind, kw, msg):
    m = tiny_backbone(kind, **kw)
    with pytest.raises(ValueError) as e:
        check_class_token_readout(m)
    assert msg in str(e.value) and "row 0" in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [("vit_small_patch14_reg4_dinov2", {}), ("vit_base_patch16_clip_224", {}),
                                     ("deit3_small_patch16_224", {}),
                                     ("eva02_tiny_patch14_224", dict(global_pool="token")),
                                     ("beit_base_patch16_224", dict(global_pool="token")),
                                     ("vit_relpos_base_patch16_clsgap_224", dict(global_pool="token"))])
def test_real_family_names_build_offline_and_record(name, kw):
    torch.manual_seed(0)
    m = create_backbone(name, num_classes=3, depth=1, **kw).eval()
    check_class_token_readout(m)
    with record_attention(m) as rec, torch.no_grad():
        out = m(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 3) and len(rec.attn) == 1
    assert rec.attn[0].shape[-1] == m.num_prefix_tokens + rec.grid[0] * rec.grid[1]
