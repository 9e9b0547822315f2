"""`python -m getam.repro.bench gpu` (getam.repro.gpucheck) without a GPU: the one-line skip, the JSON, the parts on a
CPU, and the child pytest that runs the CUDA-marked tests."""
import json, os, textwrap

import pytest
import torch
import torch.distributed as dist

from getam.repro import bench, gpucheck


def test_without_cuda_one_line_names_the_skipped_parts_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "sub" / "report.json"
    assert gpucheck.main(["--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA device found"), lines
    assert all(name in lines[0] for name in gpucheck.PARTS)
    report = json.loads(out.read_text())
    assert report["cuda"] is False and report["skipped"] == list(gpucheck.PARTS) and report["parts"] == {}


def test_bench_gpu_is_registered_and_writes_gpu_check_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    report = bench.main(["gpu"])
    assert report["cuda"] is False
    assert json.loads((tmp_path / "gpu_check.json").read_text())["skipped"] == list(gpucheck.PARTS)
    assert "no CUDA device found" in capsys.readouterr().out


def test_a_failing_part_is_recorded_and_the_next_still_runs(tmp_path):
    ran = []
    def boom(): raise RuntimeError("CUDA out of memory")
    parts = {"a": lambda: ran.append("a") or dict(loss=1.0), "b": boom, "c": lambda: ran.append("c") or {}}
    report = gpucheck.run_parts(parts, dict(parts={}), tmp_path / "r.json")
    assert ran == ["a", "c"]
    assert [r["status"] for r in report["parts"].values()] == ["ok", "failed", "ok"]
    assert report["parts"]["b"]["error"] == "RuntimeError: CUDA out of memory"
    assert json.loads((tmp_path / "r.json").read_text())["parts"]["a"]["loss"] == 1.0


def test_the_timed_parts_run_on_a_cpu():
    """The same code paths the GPU run takes, on tiny models: GETAM's maps equal the released recipe's,
    a finite training step."""
    t = gpucheck.time_getam("cpu", repeats=1, name="vit_tiny_patch16_224", size=32, ks=(2, 1),
                            num_classes=4, patch_size=8, depth=2)
    assert list(t["ms"]) == ["(a) released", "(b) getam", "(c) floor"] and t["maps_rel_diff"] < 1e-4
    s = gpucheck.time_train_step("cpu", repeats=1, backbone="vit_tiny_patch16_224", batch_size=2, crop_size=32,
                                 patch_size=8, depth=4, embed_dim=32, num_heads=2, features=16)
    assert (s["batch"], s["crop_size"], s["peak_memory_mib"]) == (2, 32, None)
    assert s["first_loss"] > 0 and s["ms_per_step"] > 0


def test_ddp_step_with_gloo_restores_the_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"): monkeypatch.delenv(k, raising=False)
    out = gpucheck.ddp_step("gloo", "cpu")
    assert (out["backend"], out["world_size"], out["wrapped"]) == ("gloo", 1, "DistributedDataParallel")
    assert out["params_with_grad"] > 50 and out["loss"] > 0
    assert not dist.is_initialized() and "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ


@pytest.mark.slow
def test_cuda_tests_part_runs_only_cuda_marked_tests_and_counts_outcomes(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_cuda.py").write_text(textwrap.dedent("""
        import pytest
        pytestmark = pytest.mark.cuda
        def test_ok(): pass
        def test_bad(): assert 1 == 2
        def test_skip(): pytest.skip("needs a CUDA device")
    """))
    (tests / "test_other.py").write_text("def test_not_cuda(): pass\n")
    r = gpucheck.run_cuda_tests(tests)
    assert (r["passed"], r["failed"], r["skipped"], r["status"]) == (1, 1, 1, "failed")
    assert sorted(t["name"].split("::")[1] for t in r["tests"]) == ["test_bad", "test_ok", "test_skip"]
    assert "assert 1 == 2" in next(t["message"] for t in r["tests"] if t["outcome"] == "failed")
    (tests / "test_cuda.py").write_text("import pytest\npytestmark = pytest.mark.cuda\ndef test_ok(): pass\n")
    assert gpucheck.run_cuda_tests(tests)["status"] == "ok"


def test_the_cuda_tests_skip_without_cuda_and_say_how_to_run_them():
    """Every test of tests/test_cuda.py carries the `cuda` mark and, without a device, the skip that names the GPU
    script."""
    import test_cuda
    marks = {m.name: m for m in test_cuda.pytestmark}
    assert "cuda" in marks and "python -m getam.repro.bench gpu" in marks["skipif"].kwargs["reason"]
    assert marks["skipif"].args == (not torch.cuda.is_available(),)
