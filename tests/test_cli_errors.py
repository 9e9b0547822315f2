"""The command lines answer a user's mistake with one `error:` line naming the path or value, exit code 2, no traceback
(unless --debug), and nothing half-written in the output folder.
Each case runs `python -m getam.train` in a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from getam.synth import make_synthvoc

TRAIN = [sys.executable, "-m", "getam.train", "--preset", "synth", "--epochs", "1", "--batch-size", "4",
         "--threads", "1", "--no-progress", "--no-plots"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthvoc(tmp_path_factory.mktemp("cli") / "synth", seed=0, n_train=8, n_val=4, size=64)


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def _run(args, tmp_path, debug=False):
    env = dict(os.environ, GETAM_RUNS_DIR=str(tmp_path / "runs"))
    env.pop("GETAM_DEBUG", None)
    return subprocess.run(TRAIN + args + (["--debug"] if debug else []), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)


def _case(name, synth, tmp_path):
    "(arguments, text the error line must contain) of one bad input."
    if name == "missing root":
        return (["--dataset", "voc", "--data-root", str(tmp_path / "nope")],
                "nope: not found; expected the PASCAL VOC 2012 folder")
    if name == "corrupt image":
        root = _copy(synth, tmp_path / "s")
        f = sorted((root / "JPEGImages").iterdir())[0]
        f.write_bytes(f.read_bytes()[:100])
        return ["--data-root", str(root)], f"{f.name}: cannot decode this image"
    if name == "missing image":
        root = _copy(synth, tmp_path / "s")
        f = sorted((root / "JPEGImages").iterdir())[0]
        f.unlink()
        return ["--data-root", str(root)], f"{f.name}: not found; expected the JPEG image"
    if name == "missing saliency map":
        root = _copy(synth, tmp_path / "s")
        f = sorted((root / "SaliencyMaps").iterdir())[0]
        f.unlink()
        return ["--data-root", str(root)], f"{f.name}: not found; expected the saliency map"
    if name == "wrong cls_labels.npy":
        root = _copy(synth, tmp_path / "s")
        np.save(root / "cls_labels.npy", np.zeros(3))
        return ["--data-root", str(root)], "cls_labels.npy: holds an array of shape (3,), expected a dict"
    if name == "malformed COCO JSON":
        root = tmp_path / "coco"
        for d in ("annotations", "train2014", "val2014"): (root / d).mkdir(parents=True)
        (root / "annotations" / "instances_train2014.json").write_text("{not json")
        return ["--dataset", "coco", "--data-root", str(root)], "instances_train2014.json: not a COCO instances file"
    if name == "weights that do not fit":
        save_file({"weight": torch.zeros(3, 3)}, str(tmp_path / "w.safetensors"))
        return (["--data-root", str(synth), "--weights", str(tmp_path / "w.safetensors")],
                "w.safetensors does not fit vit_tiny_patch16_224")
    if name == "unknown parameter value":
        return ["--data-root", str(synth), "--fusion", "max"], "fusion='max' is not valid; valid: sum, product, matmul"
    if name == "--resume with no checkpoint":
        return ["--data-root", str(synth), "--resume"], "no checkpoint to resume from"
    if name == "truncated checkpoint":
        out = tmp_path / "out"
        r = subprocess.run(TRAIN + ["--data-root", str(synth), "--out-dir", str(out), "--stop-at-step", "1"],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        (out / "state.pt").write_bytes((out / "state.pt").read_bytes()[:200])
        return ["--data-root", str(synth), "--resume"], "cannot read the checkpoint"
    raise KeyError(name)


CASES = ["missing root", "corrupt image", "missing image", "missing saliency map", "wrong cls_labels.npy",
         "malformed COCO JSON", "weights that do not fit", "unknown parameter value",
         "--resume with no checkpoint", "truncated checkpoint"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_line_and_exit_code_2(name, synth, tmp_path):
    args, expected = _case(name, synth, tmp_path)
    out = tmp_path / "out"
    existed = sorted(p.name for p in out.iterdir()) if out.exists() else None
    r = _run(args + ["--out-dir", str(out)], tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert lines[-2].startswith("error: ") and expected in lines[-2], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    after = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert after == existed, f"the output folder changed: {existed} -> {after}"    # nothing half-written left behind


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    r = _run(["--dataset", "voc", "--data-root", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "out")],
             tmp_path, debug=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "nope: not found" in r.stderr
