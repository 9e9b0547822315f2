"""getam.data on generated fixtures: VOC layout and COCO format read pixel for pixel,
joint transforms keep alignment, every error names its path and key."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from getam.classes import COCO_CLASSES, SYNTH_CLASSES, VOC_CLASSES, norm_stats
from getam.data import (COCODataset, CenterCrop, Compose, LongSideResize, Normalize, RandomCrop, RandomHFlip,
                        RandomLongSideResize, VOCDataset, coco_class_mask, coco_masks, collate, denormalize,
                        eval_transform, load_dataset, main, train_transform, voc_cls_labels)
from getam.images import PALETTE, read_image, read_png, write_palette_png, write_png
from getam.synth import make_synthvoc


# ---------------------------------------------------------------- fixtures
def _png_rgb(path, a):  # lossless RGB images, so pixel values can be compared exactly
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format="PNG")


@pytest.fixture
def voc(tmp_path):
    "A tiny VOC 2012 tree: two train images, one val, one test; masks with 255 borders; saliency 0/1/128/255."
    r = tmp_path / "VOC2012"
    seg = r / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    masks, imgs = {}, {}
    for k, name in enumerate(["2007_000001", "2007_000002", "2008_000003", "2009_000004"]):
        h, w = 5 + k, 7
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 0] = np.arange(w) * 30
        img[..., 1] = k * 50
        m = np.zeros((h, w), np.uint8)
        m[1:4, 2:5] = k + 1
        m[1, 2] = 255
        imgs[name], masks[name] = img, m
        (r / "JPEGImages").mkdir(exist_ok=True)
        Image.fromarray(img).save(r / "JPEGImages" / f"{name}.jpg", quality=95)
        if k < 3: write_png(r / "SegmentationClassAug" / f"{name}.png", m)
        write_png(r / "Sal" / f"{name}.png",
                  np.where(m > 0, 255, 0).astype(np.uint8) if k
                  else np.array([[0, 1, 128, 255, 0, 0, 0]] * h, np.uint8))
    (seg / "train.txt").write_text("2007_000001\n2007_000002\n")
    (seg / "train_aug.txt").write_text("/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png\n")
    (seg / "val.txt").write_text("2008_000003\n")
    (seg / "test.txt").write_text("2009_000004\n")
    lab = {n: np.eye(20, dtype=np.float32)[k] for k, n in enumerate(list(masks)[:3])}
    np.save(r / "cls_labels.npy", lab)
    return r, imgs, masks


def _box(x, y, w, h): return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture
def coco(tmp_path):
    "A tiny COCO tree: category ids with gaps (4, 9, 20), overlapping instances, a crowd RLE, an unlabelled image."
    from pycocotools import mask as mu
    r = tmp_path / "coco"
    (r / "annotations").mkdir(parents=True)
    _png_rgb(r / "mini" / "img_a.jpg", np.full((10, 12, 3), 77, np.uint8))  # PNG bytes: PIL reads by content
    _png_rgb(r / "mini" / "img_b.jpg", np.full((6, 6, 3), 10, np.uint8))
    crowd = np.zeros((10, 12), np.uint8)
    crowd[7:10, 0:12] = 1
    rle = mu.encode(np.asfortranarray(crowd))
    rle["counts"] = rle["counts"].decode()
    anns = [
        dict(id=1, image_id=1, category_id=4, segmentation=_box(0, 0, 8, 8), area=64, bbox=[0, 0, 8, 8], iscrowd=0),
        dict(id=2, image_id=1, category_id=20, segmentation=_box(6, 2, 4, 4), area=16, bbox=[6, 2, 4, 4], iscrowd=0),
        dict(id=3, image_id=1, category_id=9, segmentation=rle, area=36, bbox=[0, 7, 12, 3], iscrowd=1)]
    js = dict(images=[dict(id=1, file_name="img_a.jpg", height=10, width=12),
                      dict(id=2, file_name="img_b.jpg", height=6, width=6)],
              annotations=anns, categories=[dict(id=20, name="zebra"), dict(id=4, name="cat"), dict(id=9, name="dog")])
    (r / "annotations" / "instances_mini.json").write_text(json.dumps(js))
    exp = np.zeros((10, 12), np.int64)
    exp[0:8, 0:8] = 1            # cat (category 4 -> label 1), the large instance
    exp[2:6, 6:10] = 3           # zebra (category 20 -> label 3) is smaller: it wins the overlap
    exp[8:10, :] = 255           # crowd dog: only where no instance is
    exp[7, 8:] = 255
    return r, exp


# ---------------------------------------------------------------- names, palettes, PNG
def test_class_names_and_palette():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"
    assert len(COCO_CLASSES) == 81 and COCO_CLASSES[1] == "person" and COCO_CLASSES[80] == "toothbrush"
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8
    assert PALETTE[[0, 1, 2, 3, 255]].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [224, 224, 192]]


def test_palette_png_roundtrip_is_atomic(tmp_path):
    m = np.arange(30, dtype=np.uint8).reshape(5, 6)
    m[0, 0] = 255
    p = write_palette_png(tmp_path / "a" / "m.png", m)
    im = Image.open(p)
    assert im.mode == "P"
    assert np.asarray(im.getpalette()[:9]).tolist() == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    assert (read_png(p) == m).all()
    assert [f.name for f in p.parent.iterdir()] == ["m.png"]
    with pytest.raises(ValueError, match="values in 0..255"):
        write_palette_png(tmp_path / "b.png", np.full((2, 2), 300))


# ---------------------------------------------------------------- VOC layout
def test_voc_items_pixel_for_pixel(voc):
    r, _, masks = voc
    ds = VOCDataset(r, "train", saliency_root=r / "Sal")
    assert len(ds) == 2 and ds.num_classes == 20 and ds.class_names == VOC_CLASSES
    it = ds[1]
    assert it["name"] == "2007_000002"
    assert it["mask"].dtype == torch.int64 and (it["mask"].numpy() == masks["2007_000002"]).all()
    assert it["label"].dtype == torch.float32 and it["label"].nonzero().flatten().tolist() == [1]
    assert it["image"].dtype == torch.uint8 and it["image"].shape == (3, 6, 7)
    assert (it["image"].permute(1, 2, 0).numpy() == np.asarray(Image.open(r / "JPEGImages" / "2007_000002.jpg"))).all()
    assert (it["saliency"].numpy() == (masks["2007_000002"] > 0)).all()


def test_saliency_threshold(voc):
    r, _, _ = voc
    assert VOCDataset(r, "train", saliency_root=r / "Sal")[0]["saliency"][0].tolist() == [0, 1, 1, 1, 0, 0, 0]
    assert (VOCDataset(r, "train", saliency_root=r / "Sal", saliency_threshold=128)[0]["saliency"][0].tolist()
            == [0, 0, 0, 1, 0, 0, 0])


def test_sbd_lines_palette_fallback_test_split_and_int_keys(voc):
    r, _, masks = voc
    assert VOCDataset(r, "train_aug").ids == ["2007_000001"]
    it = VOCDataset(r, "test", saliency_root=r / "Sal")[0]
    assert set(it) == {"image", "name", "saliency"}
    # only VOC's palette masks, labels keyed by int ids (as some released files are)
    for f in (r / "SegmentationClassAug").iterdir(): write_palette_png(r / "SegmentationClass" / f.name, read_png(f))
    for f in (r / "SegmentationClassAug").iterdir(): f.unlink()
    (r / "SegmentationClassAug").rmdir()
    np.save(r / "cls_labels.npy", {2008000003: np.eye(20, dtype=np.float32)[2]})
    it = VOCDataset(r, "val")[0]
    assert (it["mask"].numpy() == masks["2008_000003"]).all() and it["label"].argmax().item() == 2


def test_load_dataset_dispatch(voc, coco, tmp_path, monkeypatch):
    """Each name: its class, on the given root and split, with its class names and settings keys;
    root=None: settings.ini."""
    r, _, _ = voc
    assert isinstance(load_dataset("voc", r, "val"), VOCDataset)
    (tmp_path / "settings.ini").write_text(f"[getam]\nvoc_root = {r}\n")
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("voc", split="train")) == 2
    ds = load_dataset("voc", r, "val")
    assert type(ds) is VOCDataset and (ds.root, ds.split, ds.root_key) == (r, "val", "voc_root")
    assert ds.ids == ["2008_000003"]
    assert ds.class_names == list(VOC_CLASSES) and ds.saliency_root is None
    cr, _ = coco
    ds = load_dataset("coco", cr, "mini", transform=Normalize())
    assert type(ds) is COCODataset and (ds.root, ds.split, ds.ids, ds.root_key) == (cr, "mini", [1], "coco_root")
    assert ds.class_names == ["background", "cat", "dog", "zebra"] and isinstance(ds.transform, Normalize)
    sr = make_synthvoc(tmp_path / "synth", seed=0, n_train=2, n_val=1, size=32)
    ds = load_dataset("synth", sr, "train", saliency_root=sr / "SaliencyMaps")
    assert type(ds) is VOCDataset and (ds.root, ds.split, ds.root_key) == (sr, "train", "synth_root")
    assert ds.ids == ["train_000000", "train_000001"] and ds.class_names == list(SYNTH_CLASSES)
    assert ds.saliency_key == "synth_saliency_root" and ds.saliency_root == sr / "SaliencyMaps"
    item = ds[1]
    assert item["name"] == "train_000001" and item["saliency"].shape == (32, 32)
    assert item["label"].shape == (len(SYNTH_CLASSES) - 1,)
    (tmp_path / "settings.ini").write_text(f"[getam]\nvoc_root = {r}\ncoco_root = {cr}\nsynth_root = {sr}\n")
    for name, split, root in (("voc", "val", r), ("coco", "mini", cr), ("synth", "val", sr)):   # root=None: {name}_root
        ds = load_dataset(name, split=split)
        assert (ds.root, ds.split) == (root, split), name
    with pytest.raises(ValueError, match="unknown dataset 'VOC'; valid: voc, coco, synth"): load_dataset("VOC", r)


@pytest.mark.parametrize("setup, split, kw, match", [
    (lambda r: r / "missing", "train", {},
     r"VOC2012/missing: not found; expected the PASCAL VOC 2012 folder.*set voc_root in settings.ini"),
    (lambda r: r, "trainval", {},
     (r"ImageSets/Segmentation/trainval.txt: not found; expected the list of image ids"
      r".*splits found: test, train, train_aug, val.*voc_root")),
    (lambda r: (r / "cls_labels.npy").unlink() or r, "train", {},
     r"cls_labels.npy: not found; expected the image-level labels.*voc-labels.*voc_root"),
    (lambda r: r, "train", {"saliency_root": "/nonexistent/sal"},
     r"/nonexistent/sal: not found; expected the saliency maps.*voc_saliency_root"),
])
def test_voc_errors_at_construction(voc, setup, split, kw, match):
    r, _, _ = voc
    with pytest.raises(FileNotFoundError, match=match): VOCDataset(setup(r), split, **kw)


def test_voc_errors_per_item(voc):
    r, _, _ = voc
    ds = VOCDataset(r, "train", saliency_root=r / "Sal")
    (r / "JPEGImages" / "2007_000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/2007_000001.jpg: not found; "
                                                r"expected the JPEG image of id '2007_000001'.*train.txt.*voc_root"):
        ds[0]
    (r / "SegmentationClassAug" / "2007_000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"SegmentationClassAug/2007_000002.png: not found; "
                                                r"expected the class mask.*voc_root"):
        ds[1]
    (r / "ImageSets" / "Segmentation" / "train.txt").write_text("2008_000003\n2007_000002\n")
    ds = VOCDataset(r, "train", saliency_root=r / "Sal")
    (r / "Sal" / "2008_000003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"Sal/2008_000003.png: not found; "
                                                r"expected the saliency map.*voc_saliency_root"):
        ds[0]
    np.save(r / "cls_labels.npy", {"x": np.zeros(20, np.float32)})
    with pytest.raises(KeyError, match=r"cls_labels.npy: no label for image '2008_000003'.*voc_root"):
        VOCDataset(r, "train")[0]


def test_corrupt_image_and_size_mismatch_name_the_file(voc):
    r, _, _ = voc
    (r / "JPEGImages" / "2007_000001.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=r"JPEGImages/2007_000001.jpg: cannot decode this image"):
        VOCDataset(r, "train")[0]
    write_png(r / "SegmentationClassAug" / "2007_000002.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match=r"SegmentationClassAug/2007_000002.png: "
                                         r"size \(3, 3\) differs from its image \(6, 7\)"):
        VOCDataset(r, "train")[1]
    with pytest.raises(ValueError, match="cannot decode"): read_image(r / "ImageSets" / "Segmentation" / "train.txt")


def test_unknown_dataset_and_dataset_specific_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'pascal'; valid: voc, coco, synth"):
        load_dataset("pascal", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"expected SynthVOC \(generate it with `python -m getam.synth"
                                                r".*synth_root"):
        load_dataset("synth", tmp_path / "none")
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    (tmp_path / "SegmentationClassAug").mkdir()
    np.save(tmp_path / "cls_labels.npy", {})
    with pytest.raises(FileNotFoundError, match="synth_saliency_root"):
        load_dataset("synth", tmp_path, "train", saliency_root=tmp_path / "s")
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/a.jpg: not found.*synth_root"):
        load_dataset("synth", tmp_path, "train")[0]


# ---------------------------------------------------------------- VOC tool
def test_voc_cls_labels_from_xml(voc):
    r, _, _ = voc
    (r / "Annotations").mkdir()
    objs = {"2007_000001": ["dog", "person", "dog"], "2007_000002": ["aeroplane"], "2008_000003": ["tvmonitor", "cat"]}
    for n, os_ in objs.items():
        (r / "Annotations" / f"{n}.xml").write_text(
            "<annotation>" + "".join(f"<object><name>{o}</name><difficult>0</difficult></object>" for o in os_)
            + "</annotation>")
    lab = np.load(voc_cls_labels(r, progress=False), allow_pickle=True).item()
    assert sorted(lab) == sorted(objs)
    assert lab["2007_000001"].nonzero()[0].tolist() == [11, 14] and lab["2007_000001"].dtype == np.float32
    assert lab["2008_000003"].nonzero()[0].tolist() == [7, 19]
    main(["voc-labels", "--root", str(r), "--splits", "val", "--out", str(r / "val_labels.npy")])
    assert list(np.load(r / "val_labels.npy", allow_pickle=True).item()) == ["2008_000003"]
    (r / "Annotations" / "2007_000002.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(ValueError, match=r"2007_000002.xml: unknown class 'unicorn'"): voc_cls_labels(r, progress=False)
    (r / "Annotations" / "2007_000002.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"Annotations/2007_000002.xml: not found.*voc_root"):
        voc_cls_labels(r, progress=False)


# ---------------------------------------------------------------- COCO
def test_coco_masks_overlap_rule_and_labels(coco):
    r, exp = coco
    ds = COCODataset(r, "mini")
    assert ds.class_names == ["background", "cat", "dog", "zebra"] and ds.num_classes == 3
    assert len(ds) == 1  # img_b has no annotation
    assert len(COCODataset(r, "mini", skip_unlabelled=False)) == 2
    it = ds[0]
    assert it["name"] == "img_a" and it["label"].tolist() == [1.0, 1.0, 1.0]
    assert (it["mask"].numpy() == exp).all()
    assert (it["image"] == 77).all()


def test_coco_tool_writes_the_same_masks_and_loader_reads_them(coco, capsys):
    r, exp = coco
    main(["coco-masks", "--root", str(r), "--split", "mini"])
    p = r / "SegmentationClass" / "mini" / "img_a.png"
    assert (read_png(p) == exp).all() and (read_png(r / "SegmentationClass" / "mini" / "img_b.png") == 0).all()
    lab = np.load(r / "cls_labels_mini.npy", allow_pickle=True).item()
    assert lab["img_a"].tolist() == [1, 1, 1] and lab["img_b"].tolist() == [0, 0, 0]
    write_png(p, np.full((10, 12), 2, np.uint8))  # the loader prefers the PNG when present
    assert (COCODataset(r, "mini")[0]["mask"] == 2).all()
    shutil.rmtree(r / "SegmentationClass")
    (r / "coco_seg_anno").mkdir()
    write_png(r / "coco_seg_anno" / "img_a.png", np.full((10, 12), 3, np.uint8))
    assert (COCODataset(r, "mini")[0]["mask"] == 3).all()


def test_coco_class_mask_matches_pycocotools_union(coco):
    r, exp = coco
    ds = COCODataset(r, "mini")
    m = coco_class_mask(ds.coco, 1, ds.cat_to_label)
    assert m.dtype == np.uint8 and (m == exp).all()


def test_coco_errors(coco, tmp_path):
    r, _ = coco
    with pytest.raises(FileNotFoundError, match=r"nope: not found; expected the COCO 2014 folder.*coco_root"):
        COCODataset(tmp_path / "nope", "mini")
    with pytest.raises(FileNotFoundError, match=r"coco/val2014: not found; "
                                                r"expected the images of split 'val2014'.*coco_root"):
        COCODataset(r, "val2014")
    (r / "val2014").mkdir()
    with pytest.raises(FileNotFoundError, match=r"instances_val2014.json: not found; "
                                                r"expected the COCO instances annotations.*coco_root"):
        COCODataset(r, "val2014")
    (r / "annotations" / "instances_val2014.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"instances_val2014.json: not a COCO instances file"):
        COCODataset(r, "val2014")
    with pytest.raises(FileNotFoundError, match="coco_saliency_root"):
        COCODataset(r, "mini", saliency_root=tmp_path / "s")
    (tmp_path / "s").mkdir()
    with pytest.raises(FileNotFoundError, match=r"s/img_a.png: not found; "
                                                r"expected the saliency map.*coco_saliency_root"):
        COCODataset(r, "mini", saliency_root=tmp_path / "s")[0]
    (r / "mini" / "img_a.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"mini/img_a.jpg: not found; expected the image 'img_a.jpg' "
                                                r"listed in instances_mini.json.*coco_root"):
        COCODataset(r, "mini")[0]


# ---------------------------------------------------------------- joint transforms
def _shape_item(h=48, w=80):
    "A bright rectangle with class 5 and saliency on the same pixels; a 255 border row to check ignore handling."
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[:, 12:30, 50:70] = 250
    m = torch.zeros(h, w, dtype=torch.long)
    m[12:30, 50:70] = 5
    return dict(image=img, mask=m, saliency=(m > 0).long(), label=torch.tensor([1.0]), name="shape")


def test_transforms_keep_image_mask_saliency_aligned():
    it = _shape_item()
    torch.manual_seed(0)
    for _ in range(30):
        o = Compose(RandomLongSideResize(40, 120), RandomHFlip(), RandomCrop(56))(it)
        assert o["image"].shape == (3, 56, 56) and o["mask"].shape == o["saliency"].shape == (56, 56)
        assert o["name"] == "shape" and o["label"].tolist() == [1.0]
        obj = o["mask"] == 5
        assert torch.equal(obj, o["saliency"] == 1)
        assert set(o["mask"].unique().tolist()) <= {0, 5, 255}
        # inside the (valid) frame the bright pixels are the object, up to one resampled pixel along its outline
        valid = o["mask"] != 255
        disagree = ((o["image"][0] > 125) != obj) & valid
        assert disagree.sum() <= 2 * (obj.sum(0).gt(0).sum() + obj.sum(1).gt(0).sum()) + 4


def test_flip_is_exact_and_resize_hits_the_long_side():
    it = _shape_item()
    f = RandomHFlip(p=1.0)(it)
    assert torch.equal(f["mask"], it["mask"].flip(-1)) and torch.equal(f["image"], it["image"].flip(-1))
    assert RandomHFlip(p=0.0)(it) is it
    o = LongSideResize(40)(it)
    assert o["image"].shape == (3, 24, 40) and o["mask"].shape == (24, 40)
    assert torch.equal(o["mask"][6:15, 25:35].unique(), torch.tensor([5]))  # 12:30, 50:70 at half size
    assert o["mask"][:, :25].eq(0).all() and o["mask"][15:].eq(0).all()
    torch.manual_seed(1)
    sizes = {max(RandomLongSideResize(30, 33)(it)["image"].shape[-2:]) for _ in range(40)}
    assert sizes == {30, 31, 32, 33}


def test_crop_pads_image_0_mask_255_saliency_0():
    it = _shape_item(10, 12)
    it["image"][:] = 9
    torch.manual_seed(0)
    for _ in range(10):
        o = RandomCrop(16)(it)
        inside = o["image"][0] == 9
        assert inside.sum() == 120  # the whole 10×12 image is kept, placed at a random offset
        assert ((o["image"][:, ~inside] == 0).all() and (o["mask"][~inside] == 255).all()
                and (o["saliency"][~inside] == 0).all())
    o = CenterCrop(16)(it)
    assert (o["image"][0, :10, :12] == 9).all() and (o["mask"][10:] == 255).all() and (o["mask"][:, 12:] == 255).all()
    big = _shape_item(20, 30)
    o = CenterCrop(10)(big)
    assert torch.equal(o["mask"], big["mask"][5:15, 10:20])


def test_normalize_and_recipes():
    it = _shape_item(8, 8)
    o = Normalize()(it)
    assert o["image"].dtype == torch.float32
    assert o["image"][0, 0, 0].item() == pytest.approx((0 - 0.485) / 0.229)
    assert o["image"][1, 12 - 12, 0].item() == pytest.approx(-0.456 / 0.224)
    o = Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(dict(image=torch.full((3, 2, 2), 255, dtype=torch.uint8)))
    assert torch.allclose(o["image"], torch.ones(3, 2, 2))
    assert torch.equal(denormalize(Normalize()(_shape_item())["image"]), _shape_item()["image"])
    from types import SimpleNamespace as NS
    vit = NS(pretrained_cfg=dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))  # what timm's CLIP/augreg ViTs carry
    assert norm_stats(vit) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) and norm_stats(NS(backbone=vit)) == norm_stats(vit)
    assert (norm_stats(None) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
            and norm_stats(NS(pretrained_cfg={}))[1] == (0.229, 0.224, 0.225))
    torch.manual_seed(0)
    t = train_transform(32)(_shape_item())
    assert t["image"].shape == (3, 32, 32) and t["image"].dtype == torch.float32 and t["mask"].shape == (32, 32)
    e = eval_transform()(_shape_item())
    assert e["image"].shape == (3, 48, 80) and torch.equal(e["mask"], _shape_item()["mask"])
    assert eval_transform(size=40, crop_size=40)(_shape_item())["image"].shape == (3, 40, 40)


def test_collate_batches_dicts_and_names_the_key_that_differs():
    a, b = _shape_item(), _shape_item()
    batch = collate([a, b])
    assert (batch["image"].shape == (2, 3, 48, 80) and batch["mask"].dtype == torch.int64
            and batch["name"] == ["shape", "shape"])
    with pytest.raises(ValueError, match="'image' has different shapes"): collate([a, _shape_item(40, 80)])
    dl = torch.utils.data.DataLoader([a, b, a], batch_size=2, collate_fn=collate)
    assert [x["image"].shape[0] for x in dl] == [2, 1]


# ---------------------------------------------------------------- training's view: no masks
def test_no_mask_path_gives_the_same_image_and_label_and_no_mask(voc, coco):
    r, imgs, _ = voc
    with_masks, bare = VOCDataset(r, "train"), VOCDataset(r, "train", masks=False)
    assert "mask" in with_masks[0] and sorted(bare[1]) == ["image", "label", "name"]
    for i in range(len(bare)):
        assert torch.equal(bare[i]["image"], with_masks[i]["image"])
        assert torch.equal(bare[i]["label"], with_masks[i]["label"])
    rc, _ = coco
    with_masks, bare = COCODataset(rc, "mini"), COCODataset(rc, "mini", masks=False)
    assert bare.coco is None and sorted(bare[0]) == ["image", "label", "name"]
    assert torch.equal(bare[0]["image"], with_masks[0]["image"])
    assert bare[0]["label"].tolist() == with_masks[0]["label"].tolist() == [1.0, 1.0, 1.0]
    assert with_masks.label(2).tolist() == [0.0, 0.0, 0.0]   # an image without annotations


def test_the_no_mask_path_builds_no_mask(coco, monkeypatch):
    "Training's items never rasterise a polygon: coco_class_mask is not called, not even through the transforms."
    r, _ = coco
    ds = load_dataset("coco", r, "mini", transform=train_transform(8), masks=False)
    monkeypatch.setattr("getam.data.coco_class_mask", lambda *a: pytest.fail("a mask was built"))
    batch = collate([ds[0], ds[0]])
    assert "mask" not in batch and batch["image"].shape == (2, 3, 8, 8)


def test_coco_masks_resumes_after_an_interruption(coco, monkeypatch):
    "Killed while writing image 2's PNG: no truncated PNG under the final name; the rerun writes only what is missing."
    r, exp = coco
    real_save = Image.Image.save
    def dying_save(self, fp, *args, **kwargs):   # half a PNG on disk, then the interruption
        if "img_b" in str(fp):
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n trunc")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt): coco_masks(r, "mini", progress=False)
    out = r / "SegmentationClass" / "mini"
    assert sorted(p.name for p in out.iterdir()) == ["img_a.png"]      # whole, and nothing else (no temp file)
    monkeypatch.setattr(Image.Image, "save", real_save)
    calls = []
    real_mask = coco_class_mask
    monkeypatch.setattr("getam.data.coco_class_mask", lambda coco, iid, c: calls.append(iid) or real_mask(coco, iid, c))
    coco_masks(r, "mini", progress=False)
    assert calls == [2]                                                # only the missing one
    assert (read_png(out / "img_a.png") == exp).all() and (read_png(out / "img_b.png") == 0).all()
