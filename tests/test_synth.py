"SynthVOC: deterministic per seed, the real VOC/COCO layouts, VOC-style borders, and both failure modes present."
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from getam.data import COCODataset, load_dataset, train_transform, collate
from getam.images import read_png
from getam.synth import NUM_SYNTH, SYNTH_CLASSES, V2_MAX_OBJECTS, main, make_synthvoc, synth_sample


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthvoc(tmp_path_factory.mktemp("s") / "synth", seed=3, n_train=24, n_val=8)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(make_synthvoc(tmp_path / "a", seed=5, n_train=4, n_val=2))
    b = _files(make_synthvoc(tmp_path / "b", seed=5, n_train=4, n_val=2))
    c = _files(make_synthvoc(tmp_path / "c", seed=6, n_train=4, n_val=2))
    assert a == b
    assert a.keys() == c.keys()
    differ = [k for k in a if k.startswith("JPEGImages") and a[k] != c[k]]
    assert len(differ) == 6


def test_an_image_does_not_depend_on_how_many_are_made(tmp_path):
    small = make_synthvoc(tmp_path / "a", seed=1, n_train=2, n_val=1)
    big = make_synthvoc(tmp_path / "b", seed=1, n_train=5, n_val=3)
    for name in ["train_000000", "train_000001", "val_000000"]:
        assert (small / "JPEGImages" / f"{name}.jpg").read_bytes() == (big / "JPEGImages" / f"{name}.jpg").read_bytes()
    assert not np.array_equal(synth_sample(1, "train", 0)["image"], synth_sample(1, "val", 0)["image"])


def test_voc_layout(synth):
    seg = synth / "ImageSets" / "Segmentation"
    train = seg.joinpath("train.txt").read_text().split()
    assert train == [f"train_{i:06d}" for i in range(24)] and seg.joinpath("train_aug.txt").read_text().split() == train
    assert seg.joinpath("val.txt").read_text().split() == [f"val_{i:06d}" for i in range(8)]
    for d, ext in [("JPEGImages", "jpg"), ("SegmentationClassAug", "png"), ("SegmentationClass", "png"),
                   ("SegmentationObject", "png"), ("SegmentationPart", "png"), ("SaliencyMaps", "png")]:
        assert len(list((synth / d).glob(f"*.{ext}"))) == 32, d
    from PIL import Image
    assert Image.open(synth / "SegmentationClass" / "train_000000.png").mode == "P"
    assert Image.open(synth / "SegmentationClassAug" / "train_000000.png").mode == "L"
    labels = np.load(synth / "cls_labels.npy", allow_pickle=True).item()
    assert len(labels) == 32 and all(v.dtype == np.float32 and v.shape == (NUM_SYNTH,) for v in labels.values())
    meta = json.loads((synth / "synthvoc.json").read_text())
    assert meta["seed"] == 3 and meta["class_names"] == SYNTH_CLASSES and len(meta["objects"]) == 32


def test_labels_masks_parts_and_borders_agree(synth):
    labels = np.load(synth / "cls_labels.npy", allow_pickle=True).item()
    for name, lab in labels.items():
        m = read_png(synth / "SegmentationClassAug" / f"{name}.png")
        obj = read_png(synth / "SegmentationObject" / f"{name}.png")
        part = read_png(synth / "SegmentationPart" / f"{name}.png")
        present = sorted(set(np.unique(m).tolist()) - {0, 255})
        assert present == (np.nonzero(lab)[0] + 1).tolist(), name
        assert 1 <= len(set(np.unique(obj).tolist()) - {0, 255}) <= V2_MAX_OBJECTS
        assert ((m == 255) == (obj == 255)).all()
        # parts lie on the objects of their own class
        on = part > 0
        assert ((m[on] == part[on]) | (m[on] == 255)).all()
        # the border is thin and just inside the objects: every 255 pixel touches another instance or background,
        # and no foreground pixel that is not 255 touches a different instance or background
        p = np.pad(obj, 1, mode="edge")
        nb = np.stack([p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        interior = (obj != 255) & (obj != 0)
        assert not (interior & (nb == 0).any(0)).any(), name
        assert (nb[:, obj == 255] == 0).any(0).mean() > 0.5


def test_sample_matches_files_and_the_loader(synth):
    ds = load_dataset("synth", synth, "val", saliency_root=synth / "SaliencyMaps")
    assert ds.class_names == SYNTH_CLASSES and ds.num_classes == 6 and len(ds) == 8
    it, s = ds[5], synth_sample(3, "val", 5)
    assert it["name"] == "val_000005"
    assert torch.equal(it["mask"], torch.from_numpy(s["mask"].astype(np.int64)))
    assert torch.equal(it["saliency"], torch.from_numpy((s["saliency"] > 0).astype(np.int64)))
    assert it["label"].tolist() == s["label"].tolist()
    # JPEG q95 4:4:4 smooths the N(0, 5²) pixel noise
    assert (it["image"].permute(1, 2, 0).float() - torch.from_numpy(s["image"]).float()).abs().mean() < 4
    dl = torch.utils.data.DataLoader(load_dataset("synth", synth, "train", transform=train_transform(64)),
                                     batch_size=4, collate_fn=collate)
    b = next(iter(dl))
    assert b["image"].shape == (4, 3, 64, 64) and b["mask"].shape == (4, 64, 64) and b["label"].shape == (4, 6)


def test_failure_modes_are_present():
    """Partial activation needs small parts; non-salient objects need misses that grow with smallness and distance
    from centre."""
    rec, area, dist, frac = [], [], [], []
    for i in range(150):
        s = synth_sample(0, "train", i)
        for o in s["info"]:
            m = s["instances"] == o["instance"]
            rec.append((s["saliency"][m] > 0).mean())
            area.append(o["area"])
            dist.append(o["centre_dist"])
            frac.append((s["part"][m] > 0).mean())
    rec, area, dist, frac = map(np.array, (rec, area, dist, frac))
    missed = rec < 0.5
    assert 0.15 < missed.mean() < 0.6
    assert missed[area < np.median(area)].mean() > missed[area >= np.median(area)].mean() + 0.1
    assert missed[dist > np.median(dist)].mean() > missed[dist <= np.median(dist)].mean() + 0.1
    assert 0.03 < np.median(frac) < 0.2 and (frac > 0).mean() > 0.97


@pytest.mark.parametrize("version, object_counts", [(1, {1, 2, 3}), (2, {1, 2, 3, 4, 5})])
def test_every_class_and_object_count_occurs(version, object_counts):
    "v1 draws 1-3 objects; v2 1 + Poisson(1.3), at least one per class, at most 6 (6 is rare: not asserted)."
    seen, counts = set(), set()
    for i in range(120):
        s = synth_sample(2, "train", i, version=version)
        seen |= {o["cls"] for o in s["info"]}
        counts.add(len(s["info"]))
    assert seen == set(range(1, 7)) and object_counts <= counts <= set(range(1, V2_MAX_OBJECTS + 1))


def test_coco_format_through_the_cli(tmp_path, capsys):
    main(["--out", str(tmp_path / "c"), "--format", "coco", "--seed", "3", "--n-train", "5", "--n-val", "2", "--quiet"])
    assert "5 train + 2 val" in capsys.readouterr().out
    r = tmp_path / "c"
    js = json.loads((r / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in js["categories"]] == [1, 2, 3, 4, 5, 6] and len(js["images"]) == 5
    ds = COCODataset(r, "train", saliency_root=r / "SaliencyMaps", root_key="synth_root")
    assert ds.class_names == SYNTH_CLASSES and len(ds) == 5
    for k in range(5):
        it, s = ds[k], synth_sample(3, "train", k)
        assert it["label"].tolist() == s["label"].tolist()
        assert torch.equal(it["mask"], torch.from_numpy(
            np.where(s["mask"] == 255, s["instances"] * 0 + _cls(s), s["mask"]).astype(np.int64)))
        assert torch.equal(it["saliency"], torch.from_numpy((s["saliency"] > 0).astype(np.int64)))


def _cls(s):
    "Class of each instance pixel (borders included), from the per-object info."
    out = np.zeros_like(s["instances"])
    for o in s["info"]: out[s["instances"] == o["instance"]] = o["cls"]
    return out


def test_cli_voc_and_bad_arguments(tmp_path, capsys):
    "The CLI writes, byte for byte, what make_synthvoc writes with --seed, --n-train, --n-val and --size (no default)."
    main(["--out", str(tmp_path / "v"), "--seed", "7", "--n-train", "2", "--n-val", "1", "--size", "64", "--quiet"])
    assert read_png(tmp_path / "v" / "SegmentationClassAug" / "train_000001.png").shape == (64, 64)
    written = _files(tmp_path / "v")
    assert written == _files(make_synthvoc(tmp_path / "ref", seed=7, n_train=2, n_val=1, size=64))
    jpegs = sorted(p.name for p in (tmp_path / "v" / "JPEGImages").iterdir())
    assert jpegs == ["train_000000.jpg", "train_000001.jpg", "val_000000.jpg"]
    assert json.loads(written["synthvoc.json"])["seed"] == 7
    seed8 = _files(make_synthvoc(tmp_path / "s8", seed=8, n_train=2, n_val=1, size=64))
    assert set(seed8) == set(written) and all(seed8[k] != written[k] for k in written if k.startswith("JPEGImages/"))
    with pytest.raises(ValueError, match="unknown format 'yolo'; valid: voc, coco"):
        make_synthvoc(tmp_path / "x", fmt="yolo")
    with pytest.raises(ValueError, match="size=8: expected at least 32"): make_synthvoc(tmp_path / "x", size=8)
    with pytest.raises(SystemExit): main(["--format", "yolo"])


def test_ensure_synthvoc_reuses_only_identical_settings(tmp_path):
    from getam.synth import ensure_synthvoc
    r = ensure_synthvoc(tmp_path / "s", seed=2, n_train=3, n_val=1)
    before = (r / "JPEGImages" / "train_000000.jpg").stat().st_mtime_ns
    assert ensure_synthvoc(r, seed=2, n_train=3, n_val=1) == r
    assert (r / "JPEGImages" / "train_000000.jpg").stat().st_mtime_ns == before
    ensure_synthvoc(r, seed=4, n_train=3, n_val=1)
    assert json.loads((r / "synthvoc.json").read_text())["seed"] == 4
    assert ((r / "JPEGImages" / "train_000000.jpg").read_bytes()
            == _files(make_synthvoc(tmp_path / "t", seed=4, n_train=1, n_val=0))["JPEGImages/train_000000.jpg"])


@pytest.mark.slow
def test_plain_cam_covers_mainly_the_discriminative_part():
    """Failure mode 1, measured: CAM classifiers that classify well activate on the small marker more than on the body.

    One trained net is too noisy to assert on. Over seeds 0-4 x 1 and 2 threads (`python tools/outcome_spread.py --only
    cam_test`) one net's part/rest coverage ratio ranges from 1.7 to 3.0 at threshold 0.3 (1.5 to 3.3 at 0.5), its
    per-class accuracy is 0.92 ± 0.03, and another CPU's float kernels (or thread count) move a run as much as another
    seed does: the single-net 2.5x asserted before failed on 7 of those 10 runs. So three seeds are trained, at torch's
    thread count (CI runs the suite at 1 thread and at the core count), and their mean is asserted. The ratio is
    multiplicative, so its mean is geometric: log-ratio 0.75 ± 0.22 (0.3) and 0.75 ± 0.29 (0.5) per net; for a mean of
    three, the bound 1.2 is 4.5 and 3.4 standard deviations away, and accuracy 0.85 is 3.8 sd away."""
    from getam.train.classify import cam_part_coverage, train_cam_classifier
    nets = {s: train_cam_classifier(seed=s, n_train=512, steps=300, threads=None) for s in (0, 1, 2)}
    runs = [cam_part_coverage(net, seed=s, n_val=120) for s, net in nets.items()]
    assert np.mean([r["class_accuracy"] for r in runs]) > 0.85  # all-negative guessing scores ~0.72
    for t in runs[0]["coverage"]:
        ratios = [r["coverage"][t]["part"] / r["coverage"][t]["rest"] for r in runs]
        assert np.exp(np.mean(np.log(ratios))) > 1.2, (t, ratios)

def _tree_sha256(root: Path) -> str:
    """sha256 over every file under `root`, in sorted order: its relative path and its bytes,
    each prefixed by its length."""
    import hashlib
    digest = hashlib.sha256()
    for rel, data in _files(root).items():
        digest.update(len(rel).to_bytes(8, "little") + rel.encode() + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def _samples_sha256(calls: list[tuple]) -> str:
    """sha256 over `synth_sample(*call)` for each call: every array's name, dtype, shape and raw bytes,
    and `info` as JSON."""
    import hashlib
    digest = hashlib.sha256()
    for call in calls:
        sample = synth_sample(*call)
        for key in sorted(sample):
            value = sample[key]
            if isinstance(value, np.ndarray):
                digest.update(f"{key}:{value.dtype.str}:{value.shape}".encode())
                digest.update(np.ascontiguousarray(value).tobytes())
            else:
                digest.update(f"{key}:".encode() + json.dumps(value, sort_keys=True).encode())
    return digest.hexdigest()


# Computed from the generator at commit 07731e7 (before its names were rewritten), with Pillow 13.0.0 (libjpeg-turbo 6.2
# API, zlib 1.2.13) and numpy 2.4.6. The arrays are the benchmark; the file digests also depend on Pillow's JPEG and PNG
# encoders and numpy's pickle, so after an upgrade of those only the two file digests may move.
_PINNED = {
    "voc": "0492b80f2a257fa4289c41248a0f3a4562fc88c91e3e3b1b46f91bb11a1c58c2",
    "coco": "0908bf1d02e65a92749fd3fcb075b0219f5f2cc9845e2275855652138d853ce7",
    "train": "acbe20264c613c96bb3b6d08980b0acb44ee4366a31bb0712fc4bf65f4dd8430",
    "val": "2e448b2e8577cb41f7a6839e879f015c87782a4245b6cc6e7f79701c361a1889",
    "pretrain": "1e5607ef30e97882bdcf9aec7ad005576f45eddfe6e5a2e85cc4f9a15a4ab493",
    "sizes": "245b0966321a8062599251bbaa07995109a521b088682f4e9e58c7ebd72e053e",
}


def test_generator_output_is_pinned(tmp_path):
    """SynthVOC is a benchmark: a seed's images, masks, parts and saliency never change. v1 (`version=1`,
    `python -m getam.synth --version 1`) pinned byte for byte: the raw arrays of train and val scenes, of the
    "pretrain" split `getam.train.pretrain.SceneCorpus` draws from (seeds from `BENCHMARK_SEED_LIMIT` on), of 64- and
    200-pixel scenes, and every file of a small VOC and COCO export. The scenes include clutter false positives and
    half-detected objects of the simulated saliency detector, and all six classes."""
    from getam.synth import BENCHMARK_SEED_LIMIT
    pretrain = BENCHMARK_SEED_LIMIT
    got = {
        "train": _samples_sha256([(0, "train", i, 128, 1) for i in range(20)] + [(3, "train", 5, 128, 1)]),
        "val": _samples_sha256([(0, "val", i, 128, 1) for i in range(10)]),
        "pretrain": _samples_sha256([(pretrain, "pretrain", i, 128, 1) for i in range(10)]
                                    + [(pretrain + 1, "pretrain", 3, 128, 1)]),
        "sizes": _samples_sha256([(0, "train", i, 64, 1) for i in range(4)]
                                 + [(5, "val", i, 200, 1) for i in range(3)]),
        "voc": _tree_sha256(make_synthvoc(tmp_path / "voc", seed=0, n_train=6, n_val=3, version=1)),
        "coco": _tree_sha256(make_synthvoc(tmp_path / "coco", seed=0, n_train=6, n_val=3, fmt="coco", version=1)),
    }
    assert got == _PINNED


def test_version_1_command_line_writes_the_pinned_v1(tmp_path):
    "`python -m getam.synth --version 1` writes the pinned v1 export, byte for byte."
    main(["--out", str(tmp_path / "cli"), "--seed", "0", "--n-train", "6", "--n-val", "3", "--version", "1", "--quiet"])
    assert _tree_sha256(tmp_path / "cli") == _PINNED["voc"]


# v2, pinned when it was made (getam 0.3), with the same libraries as above.
_PINNED_V2 = {
    "train": "d13f0f1d6cdd11d093f993f2197ab902800fb6e322b3a2371de96282504983cd",
    "pretrain": "9305ea09decb1aea83d244c15e1a02c60837a681a5b4da756348986b7e69fd4d",
    "voc": "1f68d33146f23b150516cb881607e5421a6b21f65b29410fb52f20986a895e73",
}


def test_v2_output_is_pinned(tmp_path):
    "SynthVOC v2, the default version, pinned the same way: scenes of train and pretrain, and a small VOC export."
    from getam.synth import BENCHMARK_SEED_LIMIT, LATEST_VERSION
    assert LATEST_VERSION == 2
    got = {
        "train": _samples_sha256([(0, "train", i) for i in range(20)] + [(3, "val", 5)]),
        "pretrain": _samples_sha256([(BENCHMARK_SEED_LIMIT, "pretrain", i) for i in range(10)]),
        "voc": _tree_sha256(make_synthvoc(tmp_path / "voc", seed=0, n_train=6, n_val=3)),
    }
    assert got == _PINNED_V2


def test_v2_statistics_stay_in_their_calibrated_ranges(tmp_path):
    """v2's scene statistics (`synth_statistics`, 256 generated training images of seeds 0 and 1) stay in the ranges
    calibrated to PASCAL VOC's published numbers: 25-30 % foreground, about 2.4 objects and 1.5 classes per image, at
    least 60 % single-class images, a median object of at least 16 tokens of the 16 x 16 grid. The detector still
    misses some objects (failure mode 2) and its precision stays below 1 (clutter false positives, blur)."""
    from getam.synth import synth_statistics
    for seed in (0, 1):
        st = synth_statistics(make_synthvoc(tmp_path / f"s{seed}", seed=seed, n_train=256, n_val=0))
        assert 0.25 <= st["fg_share"] <= 0.30, st
        assert 2.2 <= st["objects_per_image"] <= 2.7 and 1.3 <= st["classes_per_image"] <= 1.6, st
        assert st["single_class_share"] >= 0.6 and st["tokens_median"] >= 16, st
        assert 0.1 <= st["objects_missed"] <= 0.3 and st["saliency_precision"] < 0.98, st
