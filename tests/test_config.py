"Settings precedence: parameter > GETAM_* env > nearest settings.ini > ~/.config/getam > defaults."

import pytest

from getam.config import get_settings, setting


def test_nearest_file_wins_over_user_file_and_paths_resolve_against_their_file(tmp_path, monkeypatch):
    user = tmp_path / "xdg" / "getam"
    user.mkdir(parents=True)
    (user / "settings.ini").write_text("[getam]\ncoco_root = /user/coco\nvoc_root = /user/voc\n")
    proj = tmp_path / "proj"
    (proj / "nbs").mkdir(parents=True)
    (proj / "settings.ini").write_text("[getam]\nvoc_root = data/VOC\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    s = get_settings(proj / "nbs")
    assert s["voc_root"] == str((proj / "data" / "VOC").resolve())
    assert s["coco_root"] == "/user/coco"
    assert s["backbone"] == "vit_tiny_patch16_224"


def test_environment_overrides_file(tmp_path, monkeypatch):
    (tmp_path / "settings.ini").write_text("[getam]\nseed = 1\n")
    monkeypatch.setenv("GETAM_SEED", "7")
    assert setting("seed", tmp_path) == "7"


def test_unknown_key_lists_known_ones(tmp_path):
    with pytest.raises(KeyError, match="known settings: .*voc_root"):
        setting("vocroot", tmp_path)
