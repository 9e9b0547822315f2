"""getam.repro.pooled: the read-out row that follows the pooling equals a slow per-(image, class) reference on an
average-pooled ViT, is Eq. 2 exactly for the [class] row, and the decision rule does what the notebook says."""
import pytest
import timm
import torch

from getam.backbones import record_attention
from getam.cams import getam
from getam.repro.pooled import SCORES, ReadOut, decide, pooled_chefer, pooled_getam


def pooled_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2, global_pool="avg", fc_norm=False).eval()
    for p in model.parameters(): p.data.normal_(0, 0.2)
    return model


def slow_reference(model, images, labels, chefer=False):
    "Per (image, class): its own forward, autograd.grad of the logit, the mean over the patch rows of each block's map."
    maps = torch.zeros(*labels.shape, 16, dtype=torch.float64)
    for b in range(len(images)):
        for c in torch.nonzero(labels[b] > 0).flatten().tolist():
            with record_attention(model, [0, 1]) as rec, torch.enable_grad():
                logit = model(images[b:b + 1])[0, c]
            attn = rec.attn
            grads = torch.autograd.grad(logit, attn)
            if chefer:
                R = torch.eye(17, dtype=torch.float64)
                for a, g in zip(attn, grads):
                    R = R + (g[0].double() * a[0].double()).clamp(min=0).mean(0) @ R
                maps[b, c] = R[1:, 1:].mean(0)
                continue
            for a, g in zip(attn, grads):
                a, g = a[0].double(), g[0].double()
                first = (g * a).clamp(min=0).mean(0)[1:, 1:].mean(0)       # mean over the patch rows
                second = g.clamp(min=0).mean(0)[1:, 1:].mean(0)
                maps[b, c] += first * second
    return maps.view(*labels.shape, 4, 4)


def test_mean_rows_equal_the_slow_reference_on_an_average_pooled_vit():
    model = pooled_vit()
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([[1., 0, 1], [0, 1, 0], [1, 1, 1]])
    ref = slow_reference(model, x, y)
    assert ref.abs().max() > 0
    torch.testing.assert_close(pooled_getam(model, x, y, "mean").double(), ref, rtol=1e-4, atol=1e-7 * ref.max().item())
    ref = slow_reference(model, x, y, chefer=True)
    torch.testing.assert_close(pooled_chefer(model, x, y, "mean").double(), ref, rtol=1e-4, atol=1e-6)
    # the [class] row on this head is a different map (the row the head never reads)
    assert not torch.allclose(pooled_getam(model, x, y, "token"), pooled_getam(model, x, y, "mean"))
    with pytest.raises(ValueError, match="never reads"): getam(model, x, y)


def map_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2, global_pool="map").eval()
    for p in model.parameters(): p.data.normal_(0, 0.2)
    model.attn_pool.latent.data *= 10          # a query that prefers some tokens: its weights far from the mean's
    return model


def pool_weights_by_hand(pool, tokens):
    "The pool query's softmax(q k^T / sqrt(d)) over `tokens` [1, n, D], in float64, mean over heads → [n]."
    D, H = tokens.shape[-1], pool.num_heads
    q = (pool.latent[0] @ pool.q.weight.T + pool.q.bias).double().view(-1, H, D // H)       # [latent, H, d]
    k = (tokens[0] @ pool.kv.weight[:D].T + pool.kv.bias[:D]).double().view(-1, H, D // H)  # [n, H, d]
    logits = torch.einsum("lhd,nhd->hln", q, k) / (D // H) ** 0.5
    return logits.softmax(-1).mean((0, 1))


def test_pool_attention_rows_equal_the_slow_reference_on_an_attention_pooled_vit():
    model = map_vit()
    torch.manual_seed(1)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([[1., 0, 1], [0, 1, 0]])
    ref = torch.zeros(2, 3, 16, dtype=torch.float64)
    for b in range(2):
        for c in torch.nonzero(y[b] > 0).flatten().tolist():
            seen = []
            hook = model.attn_pool.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
            with record_attention(model, [0, 1]) as rec, torch.enable_grad():
                logit = model(x[b:b + 1])[0, c]
            hook.remove()
            w = torch.cat([torch.zeros(1, dtype=torch.float64), pool_weights_by_hand(model.attn_pool, seen[0])])
            for a, g in zip(rec.attn, torch.autograd.grad(logit, rec.attn)):
                a, g = a[0].double(), g[0].double()
                ref[b, c] += (w @ (g * a).clamp(min=0).mean(0))[1:] * (w @ g.clamp(min=0).mean(0))[1:]
    ref = ref.view(2, 3, 4, 4)
    assert ref.abs().max() > 0
    torch.testing.assert_close(pooled_getam(model, x, y, "map").double(), ref, rtol=1e-4, atol=1e-7 * ref.max().item())
    assert not torch.allclose(pooled_getam(model, x, y, "map"), pooled_getam(model, x, y, "mean"))
    with pytest.raises(ValueError, match="needs a timm ViT with an attention pool"): ReadOut(pooled_vit(), "map")


def rows(token: list, pooled: list, sd: float = 0.01, class_row: list | None = None) -> list[dict]:
    def row(head, method, values):
        return dict(head=head, method=method, **{s: v for s, v in zip(SCORES, values)},
                    **{s + " sd": sd for s in SCORES})
    class_row = class_row or [0.4, 0.9, 0.5, 0.5, 30.0]        # the row this head never reads: far worse
    return [row("token", "GETAM", token), row("mean", "GETAM (mean rows)", pooled),
            row("mean", "GETAM ([class] row)", class_row)]


def test_the_decision_rule():
    base = [0.10, 0.90, 0.80, 0.70, 50.0]
    assert decide(rows(base, base))[0]
    assert decide(rows(base, [0.105, 0.895, 0.795, 0.695, 10.0]))[0]          # within the spread; mIoU does not vote
    offer, why = decide(rows(base, [0.13, 0.90, 0.80, 0.70, 50.0]))          # deletion 0.03 worse than 0.01 spread
    assert not offer and "deletion AUC 0.130 vs 0.100" in why
    offer, why = decide(rows(base, [0.10, 0.90, 0.70, 0.70, 50.0]))
    assert not offer and "pointing game 0.700 vs 0.800" in why
    # a head whose [class] row scores as its pooled rows do cannot tell the read-outs apart
    offer, why = decide(rows(base, base, class_row=[0.101, 0.899, 0.80, 0.70, 20.0]))
    assert not offer and why.startswith("inconclusive")


@pytest.mark.slow
def test_measure_readouts_writes_the_table_and_reads_its_cache(tmp_path, monkeypatch):
    from getam.repro import pooled
    from getam.synth import make_synthvoc
    root = make_synthvoc(tmp_path / "synth", seed=0, n_train=8, n_val=4, size=64)
    kw = dict(seeds=(0, 1), size=64, n_images=4, batch_size=4, steps=2, epochs=1, root=root,
              runs_dir=tmp_path / "runs", out=tmp_path / "fig", threads=1)
    rows = pooled.measure_readouts(**kw)
    assert [(r["head"], r["method"]) for r in rows] == [(h, m) for h, ms in pooled.EXPLAINERS.items() for m in ms]
    text = (tmp_path / "fig" / "pooled_readout.md").read_text()
    assert text.count("\n| ") == 1 + len(rows)
    assert "Decision: GETAM with the mean rows is " in text
    assert "Decision: GETAM with the [class] + mean rows is " in text
    assert "Decision: GETAM with the pool-attention rows is " in text
    def no_measuring(*a, **k): raise AssertionError("measured again although the scores are cached")
    monkeypatch.setattr(pooled, "measure_explainer", no_measuring)
    assert pooled.measure_readouts(**kw) == rows


def test_cache_names_keep_other_recipes_apart(tmp_path):
    from getam.repro.pooled import cache_stem
    assert cache_stem("mean", 1, 128, tmp_path).name == "mean-128px-s1"
    assert cache_stem("mean", 1, 64, tmp_path, epochs=1).name == "mean-64px-s1-e1-lr0.0003"
    assert cache_stem("token", 0, 128, tmp_path).parent == tmp_path / "reproduce" / "pooled"


def test_the_token_mean_head_reads_class_and_mean_of_the_shipped_vit():
    from getam.backbones import vit_of
    from getam.repro.pooled import readout_model
    token, both = readout_model("token", 6, 64), readout_model("token+mean", 6, 64)
    assert torch.equal(vit_of(both).blocks[0].attn.qkv.weight, token.blocks[0].attn.qkv.weight)   # the shipped weights
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = vit_of(both).forward_features(x)
        expected = both.head(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1))
        torch.testing.assert_close(both(x), expected)
        torch.testing.assert_close(both(x), token.eval()(x))    # it starts as the [class] classifier
    with pytest.raises(ValueError, match="expected one of token, mean"): readout_model("attention-pool", 6)


def test_the_refusals_cite_the_committed_measurement():
    "The numbers a refusal quotes (`getam.hf.POOLED_READOUTS_MEASURED`) are those of figures/pooled_readout.json."
    import json
    from pathlib import Path
    from getam.hf import POOLED_READOUTS_MEASURED
    from getam.repro.pooled import ROWS
    record = json.loads((Path(__file__).parents[1] / "figures" / "pooled_readout.json").read_text())
    row = {(r["head"], r["method"]): r for r in record["rows"]}
    assert set(POOLED_READOUTS_MEASURED) == set(ROWS) == set(record["decisions"])
    for head, (verdict, scores) in POOLED_READOUTS_MEASURED.items():
        decision = record["decisions"][head]
        assert not decision["offer"]
        assert verdict.startswith("inconclusive") == decision["why"].startswith("inconclusive")
        worse = {s for s in SCORES if f"{s.rstrip(' ↓↑')} " in decision["why"].split(": ", 1)[-1]}
        assert set(scores) == (set() if verdict.startswith("inconclusive") else worse)
        for score, (pooled, token) in scores.items():
            assert pooled == round(row[(head, f"GETAM ({ROWS[head]})")][score], 3)
            assert token == round(row[("token", "GETAM")][score], 3)
