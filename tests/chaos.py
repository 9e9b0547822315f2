"""`python tests/chaos.py [--trace FILE] [--kill-at MOMENT] [--kill-rank R] -- TRAIN_ARGS`: run `python -m getam.train
TRAIN_ARGS`, naming every moment it passes and SIGKILLing itself at one of them (the chaos and elastic-restart tests).

A moment is `step:N` (global step N done: its optimiser update applied, its log row written) or
`ckpt:E:N:PHASE`, a point inside the checkpoint write of epoch E, step N: `begin` (nothing written yet), `weights`
(the weights file written), `state` (the state file written), `staged` (the partial folder renamed to the staged
one), `moved` (the staged weights moved over the current ones, the state not yet). `--trace FILE` appends each moment
passed to FILE. `--kill-rank R` kills only on rank R, and only in torchrun's first attempt (a restarted group runs
on)."""
import argparse, os, signal, sys

import torch

import getam.train.loop as loop
from getam.train.singlestage import main


def _moments(trace: str | None, kill_at: str | None, kill_rank: int | None):
    "The function called at every moment: record it, and kill this process at `kill_at`."
    rank, restart = int(os.environ.get("RANK", 0)), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    armed = kill_rank is None or (rank == kill_rank and restart == 0)
    def moment(name: str):
        if trace:
            with open(trace, "a") as f: f.write(name + "\n")
        if armed and name == kill_at:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return moment


def _instrument(moment):
    "Name the moments of the training steps and of every checkpoint write (see the module's docstring)."
    real_save, real_append = loop.save_checkpoint, loop.CSVLog.append
    real_weights, real_torch_save, real_rename, real_replace = loop.save_weights, torch.save, os.rename, os.replace
    where = {}   # the checkpoint being written: its "ckpt:E:N" prefix

    def log_append(self, **values):
        row = real_append(self, **values)
        moment(f"step:{values['step'] + 1}")
        return row

    def save_checkpoint(out_dir, model, optimizer, epoch, step, *a, **kw):
        where["ckpt"] = f"ckpt:{epoch}:{step}"
        moment(f"{where['ckpt']}:begin")
        try: return real_save(out_dir, model, optimizer, epoch, step, *a, **kw)
        finally: where.pop("ckpt")

    def after(real, phase, moved_only=False):
        def wrapped(*a, **kw):
            out = real(*a, **kw)
            moved = str(a[0]).endswith(f"{loop.STAGED}/model.safetensors")   # not atomic_path's own renames
            if "ckpt" in where and (moved or not moved_only): moment(f"{where['ckpt']}:{phase}")
            return out
        return wrapped

    loop.CSVLog.append = log_append
    loop.save_checkpoint = save_checkpoint
    loop.save_weights = after(real_weights, "weights")
    torch.save = after(real_torch_save, "state")
    os.rename = after(real_rename, "staged")
    os.replace = after(real_replace, "moved", moved_only=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--trace")
    p.add_argument("--kill-at")
    p.add_argument("--kill-rank", type=int)
    a, train_args = p.parse_known_args()
    _instrument(_moments(a.trace, a.kill_at, a.kill_rank))
    main([x for x in train_args if x != "--"])
