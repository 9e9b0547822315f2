"""What only a GPU can check (marked `cuda`, skipped without one;
`python -m getam.repro.bench gpu` runs them on a GPU box):
AMP training in fp16 (with a GradScaler) and bf16, the double-backward step and GETAM on CUDA equal to CPU, two
`--deterministic` runs equal bit for bit."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from fixtures import record_qkv_dtypes, tiny_backbone, tiny_batch, tiny_config, tiny_model, toy_items
import getam.train.step as step_module
from getam.cams import getam
from getam.train.singlestage import train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (on a GPU box: python -m getam.repro.bench gpu)")]


@pytest.fixture
def exact_fp32():
    "Full-precision fp32 kernels (no TF32 in matmuls or convolutions) while a test compares CUDA with CPU."
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("amp, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_amp_training_on_cuda(amp, dtype, tmp_path, monkeypatch):
    """Both phases train under autocast on CUDA with finite losses;
    fp16 goes through a GradScaler (saved in the checkpoint), bf16 needs none."""
    dtypes = record_qkv_dtypes(monkeypatch)
    r = train(tiny_config(out_dir=str(tmp_path), device="cuda", amp=amp, write_pseudo=False),
              train_ds=toy_items(8), val_ds=toy_items(2))
    assert len(r["log"]) == 4 and [row["phase"] for row in r["log"]] == [1, 1, 2, 2]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in r["log"]), r["log"]
    assert 0 <= r["metrics"]["val_miou"] <= 1
    assert set(dtypes) == {dtype}, dtypes
    assert next(r["model"].parameters()).device.type == "cuda"
    weights = load_file(tmp_path / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    scaler = torch.load(tmp_path / "state.pt", weights_only=True)["scaler"]
    if amp == "fp16": assert scaler and scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0, scaler
    else: assert scaler is None


def _step_gradients(model, batch, targets=None):
    """One phase-2 double-backward step: the losses (GETAM pseudo labels, or `targets` in their place)
    and the parameter gradients."""
    real = step_module.training_targets
    seen = []
    def targets_of(maps, *a, **k):
        seen.append(real(maps, *a, **k))
        return seen[-1] if targets is None else targets.to(maps.device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_module, "training_targets", targets_of)
        out = step_module.step_losses(model, batch, phase=2)
    out["loss"].backward()
    return (seen[0].cpu(), out["loss"].item(),
            {k: p.grad.cpu() for k, p in model.named_parameters() if p.grad is not None})


def test_double_backward_step_on_cuda_equals_cpu(exact_fp32):
    """The same step on CUDA: the same pseudo labels (up to a few threshold pixels) and,
    on the same targets, the same gradients."""
    torch.manual_seed(0)
    cpu = tiny_model()
    cpu.decoder.head[3].p = 0.0   # dropout off
    gpu = copy.deepcopy(cpu).cuda()
    batch = tiny_batch(b=3, seed=1)
    pseudo_cpu, loss_cpu, g_cpu = _step_gradients(cpu, batch)
    pseudo_gpu, loss_gpu, g_gpu = _step_gradients(gpu, {k: v.cuda() for k, v in batch.items()}, targets=pseudo_cpu)
    assert (pseudo_gpu == pseudo_cpu).float().mean() > 0.99
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-4)
    assert set(g_cpu) == set(g_gpu) and len(g_cpu) > 50
    for k in g_cpu: torch.testing.assert_close(g_gpu[k], g_cpu[k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize("kind", ["vit", "vit_hybrid", "deit_distilled"])
def test_getam_on_cuda_equals_cpu(kind, exact_fp32):
    "GETAM's maps do not depend on the device: CUDA kernels give the CPU's maps within float rounding."
    torch.manual_seed(0)
    model = tiny_backbone(kind, num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])
    want = getam(model, x, labels)
    got = getam(copy.deepcopy(model).cuda(), x.cuda(), labels.cuda())
    assert got.device.type == "cuda" and want.abs().max() > 0
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


def test_deterministic_runs_repeat_exactly_on_cuda(tmp_path):
    """Two runs of one seed under `--deterministic` end with bitwise equal weights and equal logs. Each is a fresh
    process: cuBLAS reads its workspace setting at its first call, which this pytest process has made already."""
    import subprocess, sys
    from fixtures import TINY_CLI
    from getam.synth import make_synthvoc
    root = make_synthvoc(tmp_path / "voc", seed=0, n_train=20, n_val=4, size=32, progress=False)
    for run in ("a", "b"):
        cmd = [sys.executable, "-m", "getam.train", "--data-root", str(root), *TINY_CLI, "--device", "cuda",
               "--deterministic", "--out-dir", str(tmp_path / run)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    wa, wb = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    import csv
    losses = [[row["loss"] for row in csv.DictReader(open(tmp_path / run / "log.csv"))] for run in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 10
