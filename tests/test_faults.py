"""Training through faults: SIGKILL at seeded random moments (checkpoint writes included), each followed by `--resume`,
ends with the weights of the uninterrupted run; torchrun restarts a group whose worker was SIGKILLed in phase 2, and the
restarted group resumes by itself to the weights and metrics of an uninterrupted 2-process run; the determinism switch
is on for the run only and recorded in its config (its two-run equality is a `cuda` test: tests/test_cuda.py)."""
import csv, json, os, random, shutil, signal, subprocess, sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures import TINY_CLI, tiny_config, toy_items
from getam.train.loop import recover_checkpoint
from getam.train.singlestage import arg_parser, train

HERE = Path(__file__).resolve().parent
@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from getam.synth import make_synthvoc
    return make_synthvoc(tmp_path_factory.mktemp("faults") / "voc", seed=0, n_train=20, n_val=4, size=32,
                         progress=False)


def _chaos(args: list[str], *, kill_at: str | None = None, trace: Path | None = None, torchrun: bool = False,
           kill_rank: int | None = None) -> subprocess.CompletedProcess:
    "`tests/chaos.py` (under torchrun with 2 processes and 2 restarts when `torchrun`) on `args`."
    opts = [*(["--trace", str(trace)] if trace else []), *(["--kill-at", kill_at] if kill_at else []),
            *(["--kill-rank", str(kill_rank)] if kill_rank is not None else [])]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", "2"] if torchrun else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launch, str(HERE / "chaos.py"), *opts, "--", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _losses(run: Path) -> list[str]:
    with open(run / "log.csv") as f: return [r["loss"] for r in csv.DictReader(f)]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _readable(run: Path, tmp: Path) -> int | None:
    """The step of the checkpoint that `--resume` would read in `run` (None: there is none yet), read from a copy (the
    next resume itself must do the recovering)."""
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run, tmp)
    if not recover_checkpoint(tmp): return None
    load_file(tmp / "model.safetensors")
    return torch.load(tmp / "state.pt", map_location="cpu", weights_only=True)["step"]


def _moments(trace: Path, seed: int = 0) -> list[str]:
    """5 moments drawn with `seed` from the uninterrupted run's `trace`: 2 inside checkpoint writes, 3 from all, in the
    order the run passes them."""
    names = trace.read_text().split()
    rng = random.Random(seed)
    inside = rng.sample([m for m in names if m.startswith("ckpt:")], 2)
    rest = rng.sample([m for m in names if m not in inside], 3)
    return sorted(inside + rest, key=names.index)


@pytest.mark.slow
def test_random_kills_then_resume_end_with_the_uninterrupted_weights(synth_root, tmp_path):
    args = ["--data-root", str(synth_root)] + TINY_CLI
    full, run = tmp_path / "full", tmp_path / "chaos"
    r = _chaos(args + ["--out-dir", str(full)], trace=tmp_path / "trace.txt")
    assert r.returncode == 0, r.stderr[-3000:]
    moments = _moments(tmp_path / "trace.txt")
    assert len(moments) == 5 and sum(m.startswith("ckpt:") for m in moments) >= 2, moments
    print("kill moments:", " ".join(moments))                  # shown with pytest -s
    steps = []
    for k, m in enumerate(moments):
        resume = ["--resume"] if k else []
        r = _chaos(args + ["--out-dir", str(run)] + resume, kill_at=m)
        assert r.returncode == -signal.SIGKILL, (m, r.returncode, r.stderr[-3000:])
        steps.append(_readable(run, tmp_path / "copy"))   # every kill leaves a folder that --resume can read
    r = _chaos(args + ["--out-dir", str(run), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _same_weights(full, run)
    assert _losses(full) == _losses(run)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, run))
    assert (ma["val_miou"], ma["steps"]) == (mb["val_miou"], mb["steps"])
    # the checkpoint each kill left: the last complete one before the moment (a kill inside a write keeps the old one,
    # a kill once the staged folder is complete keeps the new one)
    def expected(m: str) -> int | None:
        names = (tmp_path / "trace.txt").read_text().split()
        done = [int(x.split(":")[2]) for x in names[:names.index(m) + 1] if x.endswith(":staged")]
        return done[-1] if done else None
    assert steps == [expected(m) for m in moments], (moments, steps)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_resumes_by_itself(synth_root, tmp_path):
    args = ["--data-root", str(synth_root)] + TINY_CLI
    plain, killed = tmp_path / "plain", tmp_path / "killed"
    r = _chaos(args + ["--out-dir", str(plain)], torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # phase 2 starts at step 5 of 10; rank 1 dies after step 7, between the checkpoints of steps 6 and 9
    r = _chaos(args + ["--out-dir", str(killed)], torchrun=True, kill_at="step:7", kill_rank=1)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "resuming from the checkpoint at step 6" in out, out[-3000:]
    assert "Gloo connectFullMesh failed" not in out
    rows = list(csv.DictReader(open(killed / "log.csv")))
    assert [int(x["step"]) for x in rows] == list(range(10)) and rows[7]["phase"] == "2"
    assert _same_weights(plain, killed)
    assert _losses(plain) == _losses(killed)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (plain, killed))
    assert ma["world_size"] == mb["world_size"] == 2 and ma["val_miou"] == mb["val_miou"]
    shutil.rmtree(tmp_path / "plain")


def test_deterministic_switch_holds_for_the_run_and_is_recorded(tmp_path, monkeypatch):
    import getam.train.singlestage as singlestage
    seen, real = [], singlestage.train_step
    def spy(*a, **kw):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*a, **kw)
    monkeypatch.setattr(singlestage, "train_step", spy)
    assert vars(arg_parser().parse_args(["--deterministic"])) == dict(deterministic=True)
    r = train(tiny_config(out_dir=str(tmp_path / "on"), deterministic=True, write_pseudo=False), train_ds=toy_items(8),
              val_ds=toy_items(2))
    assert seen == [True] * 4 and r["metrics"]["config"]["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()                       # put back after the run
    seen.clear()
    off = train(tiny_config(out_dir=str(tmp_path / "off"), write_pseudo=False), train_ds=toy_items(8))
    assert seen == [False] * 4
    # on the CPU the switch changes nothing: the same losses
    assert [x["loss"] for x in off["log"]] == [x["loss"] for x in r["log"]]
