"""Tiny models, batches and data sets for the tests and the notebooks' examples (import with tests/ on sys.path)."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
from timm.models.beit import Beit
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_relpos import VisionTransformerRelPos

from getam.model import GetamSegmenter
from getam.train.singlestage import TrainConfig, make_config

TINY_KINDS = ("vit", "deit", "deit_distilled", "vit_hybrid", "vit_reg", "clip", "deit3", "eva", "beit", "relpos")


def tiny_backbone(kind: str = "vit", num_classes: int = 4, img_size: int = 32, patch_size: int = 8,
                  embed_dim: int = 32, depth: int = 3, num_heads: int = 2, **kwargs) -> nn.Module:
    """A small random timm model of family `kind` (`TINY_KINDS`, see nbs/12_backbones); any input size except `beit`
    and `relpos` (`img_size` only)."""
    fixed = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                 num_classes=num_classes)
    args = dict(fixed, dynamic_img_size=True, **kwargs)
    if kind in ("vit", "deit"): return VisionTransformer(**args)
    if kind == "vit_reg": return VisionTransformer(**dict(dict(reg_tokens=4, no_embed_class=True), **args))
    if kind == "clip": return VisionTransformer(**dict(dict(pre_norm=True, act_layer="quick_gelu"), **args))
    if kind == "deit3": return VisionTransformer(**dict(dict(init_values=1e-1, no_embed_class=True), **args))
    if kind == "eva":
        grid = (img_size // patch_size, img_size // patch_size)
        return Eva(**dict(dict(global_pool="token", use_rot_pos_emb=True, ref_feat_shape=grid, swiglu_mlp=True),
                          **args))
    if kind == "beit":
        return Beit(**dict(dict(fixed, global_pool="token", use_rel_pos_bias=True, use_abs_pos_emb=False), **kwargs))
    if kind == "relpos":
        return VisionTransformerRelPos(**dict(dict(fixed, class_token=True, global_pool="token"), **kwargs))
    if kind == "deit_distilled": return VisionTransformerDistilled(**args)
    if kind == "vit_hybrid":  # ResNetV2 stem (stride 4) + one stage of stride 2 → features at 1/8, patch size 1
        cnn = ResNetV2(layers=(1, 1), channels=(16, 32), num_classes=0, global_pool="", stem_chs=8, preact=False,
                       stem_type="same", conv_layer=partial(StdConv2dSame, eps=1e-8),
                       norm_layer=partial(GroupNormAct, num_groups=4))
        return VisionTransformer(**dict(args, patch_size=1), embed_layer=partial(HybridEmbed, backbone=cnn))
    raise ValueError(f"kind={kind!r}; expected one of {', '.join(TINY_KINDS)}")


def tiny_model(num_classes: int = 3, img_size: int = 32, **kw) -> GetamSegmenter:
    "A 4-block, 32-wide ViT with a 16-feature decoder (tests, examples, benchmarks)."
    vit = tiny_backbone("vit", num_classes=num_classes, img_size=img_size, depth=4, **kw)
    return GetamSegmenter(vit, num_classes=num_classes, features=16)

def tiny_batch(b: int = 2, num_classes: int = 3, size: int = 32, seed: int = 0) -> dict:
    "A random normalised batch with labels, saliency and masks."
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(b, num_classes, generator=g) > 0.5).float()
    y[:, 0] = 1
    return dict(image=torch.randn(b, 3, size, size, generator=g), label=y,
                saliency=(torch.rand(b, size, size, generator=g) > 0.5).long(),
                mask=torch.randint(0, num_classes + 1, (b, size, size), generator=g))

def toy_items(n: int = 16, size: int = 32, num_classes: int = 3, seed: int = 0) -> list[dict]:
    "Normalised toy items: class c is a bright square in channel c%3; saliency marks the squares."
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        img = torch.randn(3, size, size, generator=g) * 0.1
        mask = torch.zeros(size, size, dtype=torch.long)
        label = torch.zeros(num_classes)
        for c in torch.randperm(num_classes, generator=g)[:1 + i % 2].tolist():
            s = size // 4
            y, x = torch.randint(0, size - s, (2,), generator=g).tolist()
            img[c % 3, y:y + s, x:x + s] += 2.0 + c
            mask[y:y + s, x:x + s] = c + 1
            label[c] = 1
        items.append(dict(image=img, label=label, mask=mask, saliency=(mask > 0).long(), name=f"toy_{i:03d}"))
    return items

def tiny_config(**kw) -> TrainConfig:
    "A config for the tiny model on toy data (tests): 2 epochs, batch 4, no bars, no plots."
    base = dict(backbone="vit_tiny_patch16_224", patch_size=8, depth=4, features=16, epochs=2, batch_size=4,
                crop_size=32, augment=False, progress=False, plots=False, lr=0.01, device="cpu", dropout=0.0)
    return make_config(**{**base, **kw})


# `python -m getam.train` options of a tiny run from random weights (SynthVOC of 20 training images of 32 px): global
# batch 4, 5 steps an epoch, 2 epochs, phase 2 from step 5, checkpoints every 3 steps and at each epoch end
TINY_CLI = ["--no-pretrained", "--depth", "4", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "8",
            "--crop-size", "32", "--batch-size", "4", "--epochs", "2", "--cls-only-frac", "0.5", "--limit-train", "20",
            "--limit-val", "4", "--eval-every", "0", "--ckpt-every", "3", "--no-progress", "--no-plots",
            "--threads", "1", "--no-write-pseudo", "--seed", "3"]


def record_qkv_dtypes(monkeypatch) -> list:
    """Record the dtype of the first block's qkv projection in every training step (does AMP really change the
    arithmetic?)."""
    import getam.train.step as step_module
    dtypes, real = [], step_module.step_losses
    def spy(model, batch, phase, **kw):
        qkv = step_module.unwrap_model(model).backbone.blocks[0].attn.qkv
        h = qkv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        try: return real(model, batch, phase, **kw)
        finally: h.remove()
    monkeypatch.setattr(step_module, "step_losses", spy)
    return dtypes


def count_cost(monkeypatch, model: nn.Module) -> tuple[list, list]:
    """Count the cost model's two quantities from now on: `(vjps, forwards)`, the number of tensors each
    `torch.autograd.grad` call asks for and one entry per forward of `model`."""
    vjps, forwards = [], []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad",
                        lambda out, inp, *a, **k: vjps.append(len(inp)) or real_grad(out, inp, *a, **k))
    model.register_forward_pre_hook(lambda *a: forwards.append(1))   # the model is the test's own: the hook stays
    return vjps, forwards
