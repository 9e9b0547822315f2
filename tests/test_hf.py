"""Hugging Face `transformers` models through getam's calls (getam.hf): GETAM, Att-Gradients and LeGrad of every family
equal a slow per-(image, class) reference written on transformers' own `output_attentions` (and `output_hidden_states`);
a timm and an HF ViT (or distilled DeiT) given the same weights give the same maps; pooled read-outs are refused with a
message; the model is left as it was."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5")
from transformers import (BeitConfig, BeitForImageClassification, CLIPVisionConfig, CLIPVisionModel,  # noqa: E402
                          DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher, Dinov2Config,
                          Dinov2ForImageClassification, ViTConfig, ViTForImageClassification)

import timm  # noqa: E402
from getam.backbones import blocks_of, record_attention, resolve_layers  # noqa: E402
from getam.cams import att_gradients, getam, getam_layers, grad_cam, logits_of, target_labels  # noqa: E402
from getam.explain import explain  # noqa: E402
from getam.attribution import attention_rollout, chefer_attribution, legrad  # noqa: E402
from getam.hf import LinearProbe, hf_parts, hf_readout  # noqa: E402

SIZE, PATCH, CLASSES = 32, 8, 3


def config(cls, **kw):
    return cls(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=SIZE,
               patch_size=PATCH, **kw)


def family(kind: str):
    "A tiny random transformers classifier of `kind` (seeded), in eval mode."
    torch.manual_seed(0)
    if kind == "vit": model = ViTForImageClassification(config(ViTConfig, num_labels=CLASSES))
    elif kind == "deit": model = DeiTForImageClassification(config(DeiTConfig, num_labels=CLASSES))
    elif kind == "deit_teacher": model = DeiTForImageClassificationWithTeacher(config(DeiTConfig, num_labels=CLASSES))
    elif kind == "beit_cls":
        model = BeitForImageClassification(config(BeitConfig, num_labels=CLASSES, use_mean_pooling=False,
                                                  use_relative_position_bias=True))
    elif kind == "clip_probe": model = LinearProbe(CLIPVisionModel(config(CLIPVisionConfig)), CLASSES)
    else: raise KeyError(kind)
    return model.eval()


FAMILIES = ("vit", "deit", "deit_teacher", "beit_cls", "clip_probe")   # HF DeiT always carries the distillation token
PREFIX = {"vit": 1, "deit": 2, "deit_teacher": 2, "beit_cls": 1, "clip_probe": 1}


def forward_recording(model, x):
    """(logits, attentions, tokens after each layer) through transformers' public `output_attentions` and
    `output_hidden_states` on the eager path."""
    hf = hf_parts(model).model
    hf.set_attn_implementation("eager")
    try:
        if isinstance(model, LinearProbe):
            out = model.tower(pixel_values=x, output_attentions=True, output_hidden_states=True)
            logits = model.head(out.pooler_output)
        else:
            out = model(x, output_attentions=True, output_hidden_states=True)
            logits = out.logits
        return logits, out.attentions, out.hidden_states[1:]          # hidden_states[0]: the embeddings
    finally: hf.set_attn_implementation("sdpa")


def forward_with_attentions(model, x):
    "(logits, attentions) through transformers' public `output_attentions` on the eager path."
    logits, attentions, _ = forward_recording(model, x)
    return logits, attentions


def slow_reference(model, images, labels, squared=True):
    "Per (image, present class): a forward of that image alone, ∂y_c/∂A by autograd, Eq. 2 per layer, summed (Eq. 3)."
    h = w = SIZE // PATCH
    maps = torch.zeros(*labels.shape, h * w, dtype=torch.float64)
    for b in range(len(images)):
        for c in torch.nonzero(labels[b] > 0).flatten().tolist():
            logits, attentions = forward_with_attentions(model, images[b:b + 1])
            grads = torch.autograd.grad(logits[0, c], attentions)
            p = attentions[0].shape[-1] - h * w
            for a, g in zip(attentions, grads):
                a, g = a[0].double(), g[0].double()                      # [heads, N, N]
                m = (g * a).clamp(min=0).mean(0)[0, p:]
                maps[b, c] += m * g.clamp(min=0).mean(0)[0, p:] if squared else m
    return maps.view(*labels.shape, h, w)


def images_and_labels():
    torch.manual_seed(1)
    x = torch.randn(3, 3, SIZE, SIZE)
    labels = torch.tensor([[1., 0, 1], [0, 1, 0], [1, 1, 1]])   # 2, 1 and 3 present classes: three ranks
    return x, labels


@pytest.mark.parametrize("kind", FAMILIES)
def test_getam_and_att_gradients_equal_the_slow_reference(kind):
    model = family(kind)
    x, labels = images_and_labels()
    ref = slow_reference(model, x, labels)
    maps = getam(model, x, labels)
    assert maps.shape == (3, CLASSES, SIZE // PATCH, SIZE // PATCH)
    assert ref.abs().max() > 0
    torch.testing.assert_close(maps.double(), ref, rtol=1e-4, atol=1e-7 * ref.abs().max().item())
    ref_ag = slow_reference(model, x, labels, squared=False)
    torch.testing.assert_close(att_gradients(model, x, labels).double(), ref_ag, rtol=1e-4,
                               atol=1e-7 * ref_ag.abs().max().item())


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_recorder_finds_grid_prefix_and_restores_the_model(kind):
    model = family(kind)
    x, _ = images_and_labels()
    before = hf_parts(model).model.config._attn_implementation
    with torch.no_grad(): expected = logits_of(model(x))
    with record_attention(model, [0, -1]) as rec, torch.enable_grad():
        logits_of(model(x))
    assert (rec.grid, rec.num_prefix_tokens, rec.layers) == ((4, 4), PREFIX[kind], [0, 2])
    assert all(a.requires_grad for a in rec.attn)
    assert hf_parts(model).model.config._attn_implementation == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad(): torch.testing.assert_close(logits_of(model(x)), expected)
    assert resolve_layers(model, None) == [0, 1, 2] and len(blocks_of(model)) == 3


def test_a_frozen_model_is_explained_too():
    model = family("vit")
    for p in model.parameters(): p.requires_grad_(False)
    x, labels = images_and_labels()
    torch.testing.assert_close(getam(model, x, labels).double(), slow_reference(family("vit"), x, labels),
                               rtol=1e-4, atol=1e-9)


def reference_head(model, kind):
    """The final norm and classifier that each family's logits read the [class] token through, written out per family
    (not getam.hf's tables); DeiT's teacher head averages its two heads on the one token, as timm's does."""
    if kind == "vit": return lambda f: model.classifier(model.vit.layernorm(f))
    if kind == "deit": return lambda f: model.classifier(model.deit.layernorm(f))
    if kind == "beit_cls": return lambda f: model.classifier(model.beit.layernorm(f))
    if kind == "clip_probe": return lambda f: model.head(model.tower.post_layernorm(f))
    def teacher(f):
        f = model.deit.layernorm(f)
        return (model.cls_classifier(f) + model.distillation_classifier(f)) / 2
    return teacher


def legrad_reference(model, kind, images, labels, layers, pool="mean"):
    """Per (image, present class): a forward of that image alone; per layer l the class score of the head on layer l's
    tokens (their mean, or the [class] token), ∂/∂A_l by autograd, ReLU, mean over heads and query rows; summed."""
    h = w = SIZE // PATCH
    head = reference_head(model, kind)
    maps = torch.zeros(*labels.shape, h * w, dtype=torch.float64)
    for b in range(len(images)):
        for c in torch.nonzero(labels[b] > 0).flatten().tolist():
            _, attentions, tokens = forward_recording(model, images[b:b + 1])
            p = attentions[0].shape[-1] - h * w
            for i in layers:
                z = tokens[i]
                score = head(z.mean(1) if pool == "mean" else z[:, 0])[0, c]
                (g,) = torch.autograd.grad(score, attentions[i], retain_graph=True)
                maps[b, c] += g[0].double().clamp(min=0).mean((0, 1))[p:]
    model.zero_grad(set_to_none=True)
    return maps.view(*labels.shape, h, w)


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_reference_heads_give_the_logits(kind):
    "The reference is right about the head: on the last layer's [class] token it gives the model's logits."
    model = family(kind)
    x, _ = images_and_labels()
    with torch.no_grad():
        logits, _, tokens = forward_recording(model, x)
        z = tokens[-1]
        if kind == "deit_teacher":     # the model's own logits read the [distillation] token with the second head
            f = model.deit.layernorm(z)
            torch.testing.assert_close((model.cls_classifier(f[:, 0]) + model.distillation_classifier(f[:, 1])) / 2,
                                       logits)
        else: torch.testing.assert_close(reference_head(model, kind)(z[:, 0]), logits)


@pytest.mark.parametrize("pool", ["mean", "token"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_legrad_equals_the_slow_reference(kind, pool):
    "Every block by default and chosen blocks, on a batch of 2, 1 and 3 present classes; the model is left as it was."
    model = family(kind)
    x, labels = images_and_labels()
    before = hf_parts(model).model.config._attn_implementation
    ref = legrad_reference(model, kind, x, labels, [0, 1, 2], pool)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())   # transformers' own
    maps = legrad(model, x, labels, pool=pool)
    assert maps.shape == (3, CLASSES, SIZE // PATCH, SIZE // PATCH) and ref.abs().max() > 0
    torch.testing.assert_close(maps.double(), ref, rtol=1e-4, atol=1e-7 * ref.abs().max().item())
    assert maps[labels == 0].abs().sum() == 0
    ref = legrad_reference(model, kind, x, labels, [0, 2], pool)
    torch.testing.assert_close(legrad(model, x, labels, layers=[2, 0], pool=pool).double(), ref, rtol=1e-4,
                               atol=1e-7 * ref.abs().max().item())
    assert hf_parts(model).model.config._attn_implementation == before
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert all(p.grad is None for p in model.parameters())


def test_legrad_of_a_frozen_model_and_through_explain():
    model = family("vit")
    x, labels = images_and_labels()
    expected = legrad(model, x, labels)
    torch.testing.assert_close(explain(model, x, labels, method="legrad").raw, expected)
    for p in model.parameters(): p.requires_grad_(False)
    torch.testing.assert_close(legrad(model, x, labels), expected)


def timm_to_hf_vit(vit) -> ViTForImageClassification:
    """An HF ViT carrying the weights of a timm `VisionTransformer` (transformers 5 parameter names); for timm's
    distilled DeiT, an HF DeiT with its teacher head."""
    depth, dim, distilled = len(vit.blocks), vit.embed_dim, hasattr(vit, "dist_token")
    kw = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=vit.blocks[0].attn.num_heads,
              intermediate_size=vit.blocks[0].mlp.fc1.out_features, image_size=SIZE, patch_size=PATCH,
              num_labels=vit.num_classes, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)
    hf = (DeiTForImageClassificationWithTeacher(DeiTConfig(**kw)) if distilled
          else ViTForImageClassification(ViTConfig(**kw))).eval()
    base = "deit" if distilled else "vit"
    sd = {f"{base}.embeddings.cls_token": vit.cls_token, f"{base}.embeddings.position_embeddings": vit.pos_embed,
          f"{base}.embeddings.patch_embeddings.projection.weight": vit.patch_embed.proj.weight,
          f"{base}.embeddings.patch_embeddings.projection.bias": vit.patch_embed.proj.bias,
          f"{base}.layernorm.weight": vit.norm.weight, f"{base}.layernorm.bias": vit.norm.bias}
    heads = {"cls_classifier": vit.head, "distillation_classifier": vit.head_dist} if distilled \
        else {"classifier": vit.head}
    for key, head in heads.items(): sd[key + ".weight"], sd[key + ".bias"] = head.weight, head.bias
    if distilled: sd["deit.embeddings.distillation_token"] = vit.dist_token
    for i, blk in enumerate(vit.blocks):
        pre = f"{base}.layers.{i}."
        for name, t in zip("qkv", blk.attn.qkv.weight.chunk(3)): sd[pre + f"attention.{name}_proj.weight"] = t
        for name, t in zip("qkv", blk.attn.qkv.bias.chunk(3)): sd[pre + f"attention.{name}_proj.bias"] = t
        pairs = {"attention.o_proj": blk.attn.proj, "layernorm_before": blk.norm1, "layernorm_after": blk.norm2,
                 "mlp.fc1": blk.mlp.fc1, "mlp.fc2": blk.mlp.fc2}
        for name, mod in pairs.items():
            sd[pre + name + ".weight"], sd[pre + name + ".bias"] = mod.weight, mod.bias
    if set(sd) != set(hf.state_dict()):
        pytest.skip(f"transformers {transformers.__version__} names ViT's parameters differently from 5.x")
    hf.load_state_dict({k: v.detach() for k, v in sd.items()})
    return hf


def timm_and_hf(name="vit_tiny_patch16_224"):
    "A tiny random timm ViT (far from its init, so that maps differ per class) and the HF model with its weights."
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=CLASSES, img_size=SIZE,
                            patch_size=PATCH, embed_dim=32, depth=3, num_heads=2).eval()
    for p in vit.parameters(): p.data.normal_(0, 0.3)
    return vit, timm_to_hf_vit(vit)


def test_timm_and_hf_vit_with_the_same_weights_give_the_same_maps():
    vit, hf = timm_and_hf()
    x, labels = images_and_labels()
    with torch.no_grad(): torch.testing.assert_close(hf(x).logits, vit(x), rtol=1e-4, atol=1e-5)
    a, b = getam(vit, x, labels), getam(hf, x, labels)
    assert a.abs().max() > 0
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6 * a.abs().max().item())
    ra, rb = getam_layers(vit, x, labels), getam_layers(hf, x, labels)
    torch.testing.assert_close(rb.a_cls, ra.a_cls, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_cam(hf, x, labels), grad_cam(vit, x, labels), rtol=1e-3, atol=1e-5)
    for method in (attention_rollout, chefer_attribution):    # every block, through the same recorder
        a, b = method(vit, x, labels), method(hf, x, labels)
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6 * a.abs().max().item())


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_timm_and_hf_with_the_same_weights_give_the_same_legrad_maps(name):
    "Both pools, every block and one; the distilled DeiT's two heads are averaged on one token in both libraries."
    vit, hf = timm_and_hf(name)
    x, labels = images_and_labels()
    with torch.no_grad(): torch.testing.assert_close(logits_of(hf(x)), logits_of(vit(x)), rtol=1e-4, atol=1e-5)
    for kw in (dict(), dict(pool="token"), dict(layers=[1])):
        a, b = legrad(vit, x, labels, **kw), legrad(hf, x, labels, **kw)
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6 * a.abs().max().item())


@pytest.mark.parametrize("build, says", [
    (lambda: BeitForImageClassification(config(BeitConfig, num_labels=CLASSES)), "use_mean_pooling=False"),
    (lambda: Dinov2ForImageClassification(config(Dinov2Config, num_labels=CLASSES)), "concatenated with the mean"),
    (lambda: LinearProbe(transformers.SiglipVisionModel(config(transformers.SiglipVisionConfig)), CLASSES),
     "attention-pooling query"),
])
def test_pooled_read_outs_are_refused_and_grad_cam_still_runs(build, says):
    model = build().eval()
    x, labels = images_and_labels()
    assert hf_readout(model) in ("mean", "token+mean", "attention-pool")
    for method in (getam, att_gradients, legrad, lambda *a: legrad(*a, pool="token")):
        with pytest.raises(ValueError, match=says): method(model, x, labels)
    assert grad_cam(model, x, labels).shape == (3, CLASSES, 4, 4)


@pytest.mark.parametrize("tower", [
    lambda: transformers.ViTModel(config(ViTConfig)), lambda: transformers.DeiTModel(config(DeiTConfig)),
    lambda: transformers.BeitModel(config(BeitConfig, use_mean_pooling=False)),
    lambda: transformers.Dinov2Model(config(Dinov2Config)), lambda: CLIPVisionModel(config(CLIPVisionConfig)),
])
def test_the_head_rebuilt_for_a_probed_tower_gives_the_probe_logits(tower):
    "getam.hf.POOLERS: the last layer's [class] token through the rebuilt pooler and the probe's head = the logits."
    from getam.hf import hf_token_head
    torch.manual_seed(0)
    probe = LinearProbe(tower().eval(), CLASSES).eval()
    x, _ = images_and_labels()
    with torch.no_grad():
        logits, _, tokens = forward_recording(probe, x)
        torch.testing.assert_close(hf_token_head(probe)(tokens[-1])[:, 0], logits)
        torch.testing.assert_close(logits, probe(x))

def test_legrad_refuses_a_head_it_cannot_rebuild():
    "GETAM needs only the logits; LeGrad needs the head itself, which getam knows for the classifiers and LinearProbe."
    model = nn.Sequential(family("vit"))
    x, labels = images_and_labels()
    assert getam(model, x, labels).abs().sum() > 0
    with pytest.raises(TypeError, match="getam knows the heads of ViTForImageClassification.*got Sequential around"):
        legrad(model, x, labels)
    with pytest.raises(TypeError, match="legrad needs the tokens after every block"):
        legrad(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, CLASSES)), x, labels)


def test_explain_takes_an_hf_model():
    model = family("deit_teacher")
    x, _ = images_and_labels()
    exp = explain(model, x, top_k=2)
    with torch.no_grad(): logits = model(x).logits
    assert exp.maps.shape == (3, CLASSES, SIZE, SIZE) and exp.labels.sum(1).tolist() == [2, 2, 2]
    torch.testing.assert_close(exp.labels, target_labels(None, logits, 2))
    torch.testing.assert_close(exp.raw, getam(model, x, exp.labels))


def test_layer_explorer_steps_through_an_hf_model():
    pytest.importorskip("ipywidgets")
    from getam.widgets import LayerExplorer
    model = family("beit_cls")
    torch.manual_seed(2)
    dataset = [dict(image=torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8), label=torch.tensor([0., 1, 0]))]
    ex = LayerExplorer(model, dataset, mean=(0.5,) * 3, std=(0.5,) * 3, scale=1)
    x = ex.item(0)[1][None]
    assert [o for o in ex.map_picker.options] == ["GETAM", "A_CLS", "∇A_CLS", "Grad-CAM", "Att-Gradients"]
    assert [o[1] for o in ex.layer_slider.options] == [0, 1, 2, "sum"]
    ex.class_picker.value = 1
    torch.testing.assert_close(torch.from_numpy(ex.map), getam(model, x, torch.ones(1, CLASSES))[0, 1])
    ex.map_picker.value = "Att-Gradients"
    torch.testing.assert_close(torch.from_numpy(ex.map), att_gradients(model, x, torch.ones(1, CLASSES))[0, 1])
    assert ex.render()[:4] == b"\x89PNG"


def test_one_forward_and_one_vjp_per_rank(monkeypatch):
    "The cost model holds for HF models too: one forward of the batch, then max_b K_b attention-only VJPs."
    from fixtures import count_cost
    model = family("vit")
    x, labels = images_and_labels()                  # 2, 1 and 3 present classes: 3 ranks
    vjps, forwards = count_cost(monkeypatch, model)
    getam(model, x, labels)
    assert len(forwards) == 1 and vjps == [3, 3, 3]   # each VJP asks for the 3 blocks' attention only


def test_legrad_costs_one_forward_and_one_vjp_per_rank_and_block(monkeypatch):
    "As on timm: one forward, then per block max_b K_b VJPs, each w.r.t. that block's attention only."
    from fixtures import count_cost
    model = family("deit_teacher")
    x, labels = images_and_labels()                  # 3 ranks, 3 blocks
    vjps, forwards = count_cost(monkeypatch, model)
    legrad(model, x, labels)
    assert len(forwards) == 1 and vjps == [1] * 9
