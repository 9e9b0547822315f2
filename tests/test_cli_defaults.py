"""The command lines built by `getam.utils.parser_from_signature` call their function with its own defaults: nothing
to drift. `main` is run with the function replaced by a recorder of the arguments it is called with."""
import functools
import inspect
from pathlib import Path

import pytest

import getam.repro.explainers_bench as explainers_bench
import getam.train.multistage as multistage
import getam.train.pretrain as pretrain
from getam.config import setting


def _called_with(monkeypatch, module, name: str, argv: list[str]) -> dict:
    "The full arguments (defaults applied) `module.main(argv)` calls `module.name` with."
    fn, calls = getattr(module, name), []
    @functools.wraps(fn)
    def record(*args, **kwargs):
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return {}
    monkeypatch.setattr(module, name, record)
    module.main(argv)
    return calls[0]


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


@pytest.mark.parametrize("module,name,argv,cli_own", [
    (multistage, "train_deeplab", ["--pseudo-dir", "p"],
     dict(dataset=lambda: setting("dataset"), out_dir=lambda: str(Path(setting("runs_dir")) / "deeplab"))),
    (pretrain, "pretrain", [], dict(arch=dict, command=lambda: "python -m getam.train.pretrain ")),
    (explainers_bench, "benchmark", [], {}),
])
def test_no_options_means_the_functions_defaults(monkeypatch, module, name, argv, cli_own):
    "`cli_own`: what the command line itself decides (settings.ini, the ARCH_KEYS overrides, the command run)."
    fn = getattr(module, name)
    want = {**_defaults(fn), **{k: f() for k, f in cli_own.items()}}
    got = _called_with(monkeypatch, module, name, argv)
    assert {k: got[k] for k in want} == want


def test_old_flags_still_parse(monkeypatch):
    got = _called_with(monkeypatch, multistage, "train_deeplab",
                       ["--pseudo-dir", "p", "--no-flip", "--crf", "none", "--val-split", "", "--scales", "0.5 1"])
    assert (got["flip"], got["crf"], got["val_split"], got["eval_scales"]) == (False, None, None, "0.5 1")
    got = _called_with(monkeypatch, pretrain, "pretrain", ["--depth", "6", "--embed-dim", "64", "--resume",
                                                           "--no-progress"])
    assert (got["arch"], got["resume"], got["progress"]) == (dict(embed_dim=64, depth=6), True, False)
    got = _called_with(monkeypatch, explainers_bench, "benchmark", ["--n-images", "8", "--out", "o"])
    assert (got["n_images"], got["out"], got["seed"]) == (8, "o", 0)
