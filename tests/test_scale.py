"""getam.repro.scale: the full-size stand-ins at tiny counts (exact counts, COCO JSON that pycocotools reads), the
memory readings, the projection's arithmetic on numbers checked by hand, and `python -m getam.repro.bench scale
--size small` end to end."""
import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from getam.data import COCODataset, load_dataset, train_transform
from getam.images import read_image
from getam.repro import scale
from getam.repro.bench import main as bench_main


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # numpy 2's copy= notice inside pycocotools
def test_coco_standin_has_the_requested_counts_and_valid_json(tmp_path):
    root = scale.write_coco_standin(tmp_path, "mini", n_images=7, n_instances=50, hw=(40, 56), pool=3,
                                    crowd_frac=0.3, progress=False)
    js = json.loads((root / "annotations" / "instances_mini.json").read_text())
    assert (len(js["images"]), len(js["annotations"]), len(js["categories"])) == (7, 50, 80)
    assert sorted(c["id"] for c in js["categories"]) == scale.COCO_CATEGORY_IDS and max(scale.COCO_CATEGORY_IDS) == 90
    assert {a["id"] for a in js["annotations"]} == set(range(1, 51))
    for a in js["annotations"]:
        assert {"segmentation", "bbox", "area", "iscrowd", "image_id", "category_id"} <= set(a)
        assert isinstance(a["segmentation"], dict) == bool(a["iscrowd"])
    assert any(a["iscrowd"] for a in js["annotations"]) and not all(a["iscrowd"] for a in js["annotations"])
    api = COCO(str(root / "annotations" / "instances_mini.json"))
    assert all(len(api.getAnnIds(imgIds=[i])) >= 1 for i in api.imgs)
    for info in js["images"]:
        assert read_image(root / "mini" / info["file_name"]).shape == (3, info["height"], info["width"]) == (3, 40, 56)
    for a in api.loadAnns(api.getAnnIds()):   # every instance decodes to a mask of the image's size, inside its bbox
        m = api.annToMask(a)
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        assert m.shape == (40, 56) and (len(ys) == 0 or (xs.min() >= int(x) and ys.min() >= int(y)))
    assert len(COCODataset(root, "mini")) == 7


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cached_view_links_resolve_when_the_root_is_relative(tmp_path, monkeypatch):
    "The view's links must point at the data from any working directory: `--out runs/scale` is relative."
    monkeypatch.chdir(tmp_path)
    root = scale.write_coco_standin(tmp_path / "data", "train2014", n_images=3, n_instances=6, hw=(16, 16), pool=2,
                                    progress=False).relative_to(tmp_path)
    view = scale._cached_view(root, COCODataset(root, "train2014"), 2)
    names = lambda d: sorted(p.name for p in d.iterdir())
    assert names(view / "train2014") == names(root / "train2014")
    assert len(list((view / "SegmentationClass" / "train2014").iterdir())) == 2
    assert len(COCODataset(view, "train2014")) == 3


def test_coco_standin_refuses_fewer_instances_than_images(tmp_path):
    with pytest.raises(ValueError, match="n_instances=3: expected at least one per image"):
        scale.write_coco_standin(tmp_path, "mini", n_images=5, n_instances=3, hw=(8, 8), pool=1, progress=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_crowd_rle_is_the_box():
    rle = scale._crowd_rle([1, 2, 2, 3], (6, 5))
    m = mask_utils.decode(mask_utils.frPyObjects(rle, 6, 5))
    expected = np.zeros((6, 5), np.uint8)
    expected[2:5, 1:3] = 1
    assert (m == expected).all() and sum(rle["counts"]) == 30


def test_voc_standin_has_voc_layout_and_counts(tmp_path):
    root = scale.write_voc_standin(tmp_path / "voc", n_train=7, n_val=3, hw=(30, 40), pool=2, progress=False)
    train = load_dataset("voc", root, "train_aug", saliency_root=root / "SaliencyMaps")
    assert (len(train), len(load_dataset("voc", root, "val"))) == (7, 3)
    item = train[5]
    assert item["image"].shape == (3, 30, 40) and item["mask"].shape == item["saliency"].shape == (30, 40)
    assert item["label"].shape == (20,) and torch.equal(item["label"], train[1]["label"])   # 5 and 1 share a scene
    present = {int(c) for c in item["mask"].unique() if 0 < c < 255}
    assert set((item["label"].nonzero().flatten() + 1).tolist()) == present
    assert len({p.stat().st_ino for p in (root / "JPEGImages").iterdir()}) == 2   # the pool, hard-linked


def test_generation_runs_once(tmp_path):
    kw = dict(n_train=3, n_val=1, hw=(16, 16), pool=2, progress=False)
    root = scale.write_voc_standin(tmp_path, **kw)
    first = (root / "cls_labels.npy").stat().st_mtime_ns
    scale.write_voc_standin(tmp_path, **kw)
    assert (root / "cls_labels.npy").stat().st_mtime_ns == first
    scale.write_voc_standin(tmp_path, **{**kw, "n_train": 4})   # other settings: generated again
    assert len(load_dataset("voc", root, "train_aug")) == 4


def test_process_memory_sees_private_growth():
    before = scale.process_memory()
    hold = np.ones(80_000_000 // 8)
    after = scale.process_memory()
    assert set(before) == {"rss", "pss", "uss"} and after["uss"] - before["uss"] > 70e6
    del hold


def test_loader_run_counts_images_and_reads_each_workers_memory(tmp_path):
    root = scale.write_voc_standin(tmp_path, n_train=10, n_val=0, hw=(20, 24), pool=2, progress=False)
    ds = load_dataset("voc", root, "train_aug", transform=train_transform(16), masks=False)
    run = scale.loader_run(ds, workers=2, batch_size=3, limit=9, probes=2)
    assert run["images"] == 9 and sorted(run["workers_memory"]) == [0, 1]
    assert all(m["start_rss"] >= m["start_uss"] > 0 for m in run["workers_memory"].values())
    assert run["per_worker"] == pytest.approx(run["images_per_s"] / 2)


def test_eval_writes_only_label_pngs(tmp_path):
    root = scale.write_voc_standin(tmp_path, n_train=0, n_val=3, hw=(32, 48), pool=3, progress=False)
    e = scale.eval_cost("voc", root, "val", n=2, scales="single", flip=False)
    assert (e["images"], e["files"], e["other_files"], e["classes"]) == (2, 2, [], 21)
    assert 0 < e["png_bytes"] <= e["written_bytes"] < 32 * 48   # less than one byte a pixel: no probability maps


def test_projection_arithmetic_by_hand():
    a = dict(scale.ASSUMPTIONS, gpu_tflops=2.0, epochs=3, batch=4, voc_train=10, coco_train=4, cores=(8, 32),
             voc_val=1_600, coco_val=40_000)
    evals = {"coco": dict(images_per_s_per_core=0.5, png_bytes=2000.0, hw=[10, 10], classes=81)}
    rows = scale.project_eval(evals, {"coco": dict(flops=4e12, backbone="b")}, a)
    assert [r["kind"] for r in rows] == ["projected"] * 5
    assert rows[0]["value"] == pytest.approx(40_000 / (0.5 * 8) / 3600)     # 10,000 s on 8 cores
    assert rows[1]["value"] == pytest.approx(40_000 / (0.5 * 32) / 3600)    # 2,500 s on 32
    assert rows[2]["value"] == pytest.approx(0.08)                          # 40,000 × 2,000 B = 80 MB
    assert rows[3]["value"] == pytest.approx(81 * 100 * 4 * 40_000 / 1e12)  # probability maps, TB
    assert rows[4]["value"] == pytest.approx(40_000 * 2 / 3600)             # 4 TFLOP at 2 TFLOP/s = 2 s an image
    evals["coco"]["cpu_part_images_per_s_per_core"] = 2.0                   # the CRF alone: 4 times faster
    beside = scale.project_eval(evals, {}, a)[4:]
    assert [r["value"] * 3600 for r in beside] == pytest.approx([40_000 / 16, 40_000 / 64])
    steps = {"b": dict(plain=dict(flops=2e12, seconds=10.0), double_backward=dict(flops=2.5e12, seconds=30.0, size=8))}
    rows = scale.project_training(steps, {"voc": 1.0, "coco": 1.0}, a)
    # plain: 2 TFLOP at 2 TFLOP/s = 1 s; double backward: 3 times the plain step on the CPU = 3 s (not its FLOPs)
    # VOC: 3 epochs × ceil(10 / 4) = 9 steps, ceil(4.5) = 5 in phase 1 at 1 s, 4 in phase 2 at 3 s: 17 s
    assert rows[0]["value"] * 3600 == pytest.approx(5 * 1 + 4 * 3)
    assert rows[1]["value"] == math.ceil(4 / 3 / 1.0) == 2                  # 1.33 images/s consumed, 1 per worker
    assert rows[2]["value"] * 3600 == pytest.approx(2 * 1 + 1 * 3)          # COCO: 3 steps, 2 in phase 1


def test_table_marks_each_row():
    rows = [scale._row("x", 1234.5, "s", "measured", "b"), scale._row("y", None, "h", "projected", "")]
    assert scale.format_table(rows).splitlines()[2:] == ["| x | 1,234 | s | measured | b |",
                                                         "| y | nan | h | projected |  |"]


def test_scale_refuses_unknown_sizes_and_parts(tmp_path):
    with pytest.raises(ValueError, match="size='huge': expected one of full, small"): scale.scale(tmp_path, "huge")
    with pytest.raises(ValueError, match=r"parts: unknown \['speed'\]"): scale.scale(tmp_path, parts=("speed",))


@pytest.mark.slow
def test_bench_scale_small_end_to_end(tmp_path, capsys):
    bench_main(["scale", "--size", "small", "--out", str(tmp_path / "out"), "--workers", "2"])
    res = json.loads((tmp_path / "out" / "scale.json").read_text())
    assert {"size", "sizes", "assumptions", "environment", "data", "model", "eval", "rows"} <= set(res)
    assert set(res["data"]) == {"voc_masks_True", "voc_masks_False", "coco_annotations", "coco_masks_on_the_fly",
                                "coco_costs", "coco_masks_cached", "coco_masks_False", "coco_epoch_before",
                                "coco_epoch_after"}
    assert res["data"]["coco_epoch_after"]["images"] == scale.SIZES["small"]["coco_train"]
    for m in res["data"]["coco_epoch_after"]["workers_memory"].values():   # forked, as training's workers: shared pages
        assert m["start_uss"] < m["start_rss"] / 4
    backbone = scale.SIZES["small"]["models"][0][0]
    step = res["model"][backbone]
    assert step["double_backward"]["flops"] > step["plain"]["flops"] > 0 and step["plain"]["peak_rss"] > 0
    assert res["eval"]["evals"]["voc"]["other_files"] == [] and res["eval"]["evals"]["coco"]["classes"] == 81
    kinds = {r["kind"] for r in res["rows"]}
    assert kinds == {"measured", "projected"} and "| what | value |" in capsys.readouterr().out


_FD_LIMITED = """
import resource, sys, torch
from torch.utils.data import Dataset
from getam.repro import scale
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
class Tiny(Dataset):
    def __len__(self): return 300
    def __getitem__(self, i): return {"image": torch.full((2,), float(i))}
run = scale.loader_run(Tiny(), workers=1, batch_size=1, probes=300)
print(run["images"], len(run["workers_memory"][0]["uss_mib"]))
"""


def test_loader_run_holds_no_worker_tensor_past_its_batch():
    "300 batches under a limit of 64 file descriptors: a kept worker tensor would hold one descriptor per batch."
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _FD_LIMITED], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["300", "300"]
