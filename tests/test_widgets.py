"""getam.widgets.LayerExplorer: headless control/render checks,
and a real-browser check in JupyterLab + headless Chromium."""
import contextlib, json, os, shutil, socket, subprocess, sys, time, secrets, signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from getam import cams, widgets
from fixtures import tiny_backbone
from getam.data import load_dataset
from getam.synth import make_synthvoc

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # tiny tensors: threads only add contention
    root = make_synthvoc(tmp_path_factory.mktemp("synth"), n_train=1, n_val=3, size=32)
    ds = load_dataset("synth", root, "val")
    torch.manual_seed(0)
    vit = tiny_backbone(num_classes=ds.num_classes, img_size=32, patch_size=8, depth=3).eval()
    yield ds, vit
    torch.set_num_threads(threads)


def _x(ex):
    return ex.item(ex.image_picker.value)[1][None]


def test_shown_map_equals_cams_for_every_layer_and_class(setup):
    ds, vit = setup
    ex = widgets.LayerExplorer(vit, ds, scale=1)
    x, C = _x(ex), ds.num_classes
    ones = torch.ones(1, C)
    ref = cams.getam_layers(vit, x, ones)
    fused = cams.getam(vit, x, ones).detach()
    test_layers = [o[1] for o in ex.layer_slider.options]
    assert test_layers == [0, 1, 2, "sum"]
    for c in [o[1] for o in ex.class_picker.options][:3]:   # the present class(es) first, then absent ones
        ex.class_picker.value = c
        for layer in test_layers:
            ex.layer_slider.value = layer
            ex.map_picker.value = "GETAM"
            want = fused[0, c] if layer == "sum" else ref.per_layer[layer, 0, c].detach()
            np.testing.assert_allclose(ex.map, want.numpy(), rtol=1e-5, atol=1e-7)
            ex.map_picker.value = "A_CLS"
            want = ref.a_cls[:, 0].sum(0) if layer == "sum" else ref.a_cls[layer, 0]
            np.testing.assert_allclose(ex.map, want.numpy(), rtol=1e-5, atol=1e-7)
            ex.map_picker.value = "∇A_CLS"
            want = ref.grad_cls[:, 0, c].sum(0) if layer == "sum" else ref.grad_cls[layer, 0, c]
            np.testing.assert_allclose(ex.map, want.numpy(), rtol=1e-5, atol=1e-9)
        assert float(np.abs(ex.map).max()) > 0      # a random ViT still has non-zero gradients
    # the sum position of the slider is Eq. 3: the sum of the per-block maps
    ex.map_picker.value, ex.layer_slider.value = "GETAM", "sum"
    np.testing.assert_allclose(ex.map, ref.per_layer[:, 0, ex.class_picker.value].sum(0).detach().numpy(), rtol=1e-5)


def test_baselines_equal_cams(setup):
    ds, vit = setup
    ex = widgets.LayerExplorer(vit, ds, scale=1)
    x, ones = _x(ex), torch.ones(1, ds.num_classes)
    fns = dict(zip(["CAM (add)", "CAM (ignore)", "Grad-CAM", "Att-Gradients", "TS-CAM"],
                   [cams.cam_add, cams.cam_ignore, cams.grad_cam, cams.att_gradients, cams.ts_cam]))
    for name, fn in fns.items():
        ex.map_picker.value = name
        assert ex.layer_slider.disabled
        np.testing.assert_allclose(ex.map, fn(vit, x, ones)[0, ex.class_picker.value].detach().numpy(),
                                   rtol=1e-5, atol=1e-7)
    ex.map_picker.value = "GETAM"
    assert not ex.layer_slider.disabled


def test_every_control_changes_the_rendered_image(setup):
    ds, vit = setup
    ex = widgets.LayerExplorer(vit, ds, opacity=0.5, scale=2)
    seen = [ex.image.value]
    assert seen[0][:8] == b"\x89PNG\r\n\x1a\n"

    def changed(widget, value):
        widget.value = value
        assert ex.image.value != seen[-1], f"{widget.description} -> {value!r} did not change the image"
        seen.append(ex.image.value)

    changed(ex.layer_slider, 0)
    changed(ex.layer_slider, 2)
    changed(ex.class_picker, [o[1] for o in ex.class_picker.options if o[1] != ex.class_picker.value][0])
    changed(ex.map_picker, "A_CLS")
    changed(ex.map_picker, "Grad-CAM")
    changed(ex.opacity, 0.9)
    changed(ex.image_picker, ex.indices[1])
    # opacity 0: the picture is the image itself, whatever the map
    ex.opacity.value = 0.0
    from PIL import Image
    import io
    shown = np.asarray(Image.open(io.BytesIO(ex.image.value)).convert("RGB"))
    img = ds[ex.indices[1]]["image"].permute(1, 2, 0).numpy()
    s = shown.shape[0] // img.shape[0]
    np.testing.assert_array_equal(shown[::s, ::s], img)


def test_maps_are_computed_once_per_image(setup, monkeypatch):
    ds, vit = setup
    calls = []
    real = widgets.image_maps
    monkeypatch.setattr(widgets, "image_maps", lambda *a, **k: calls.append(1) or real(*a, **k))
    ex = widgets.LayerExplorer(vit, ds)
    assert len(calls) == 1
    for layer in [0, 1, "sum"]: ex.layer_slider.value = layer
    ex.map_picker.value = "TS-CAM"
    ex.opacity.value = 0.2
    assert len(calls) == 1
    ex.image_picker.value = ex.indices[1]
    ex.image_picker.value = ex.indices[0]
    assert len(calls) == 2


def test_present_classes_first(setup):
    ds, vit = setup
    for i in range(len(ds)):
        ex = widgets.LayerExplorer(vit, ds, indices=[i])
        label = ds[i]["label"]
        K = int(label.sum())
        assert K > 0
        order = [o[1] for o in ex.class_picker.options]
        assert sorted(order) == list(range(ds.num_classes))
        assert all(label[c] > 0 for c in order[:K]) and all(label[c] == 0 for c in order[K:])
        assert all("✓" in o[0] for o in ex.class_picker.options[:K])
        assert ex.class_picker.value == order[0]


def test_bad_input_is_named(setup):
    ds, vit = setup
    with pytest.raises(ValueError, match="Grad-CAMM"):
        widgets.LayerExplorer(vit, ds, baselines=["Grad-CAMM"])
    with pytest.raises(ValueError, match="empty"):
        widgets.LayerExplorer(vit, ds, indices=[])


# ---------------------------------------------------------------------------------------------------
# Real browser: JupyterLab on loopback, headless Debian chromium driven by Playwright.

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

NOTEBOOK_SRC = [
    "import torch\n"
    "from getam.synth import make_synthvoc\n"
    "from getam.data import load_dataset\n"
    "from getam.backbones import create_backbone\n"
    "from getam.widgets import LayerExplorer\n"
    "root = make_synthvoc('synth', n_train=1, n_val=2, size=32)\n"
    "ds = load_dataset('synth', root, 'val')\n"
    "torch.manual_seed(0)\n"
    "vit = create_backbone('vit_tiny_patch16_224', num_classes=ds.num_classes, img_size=32, patch_size=8,\n"
    "                      embed_dim=32, depth=3, num_heads=2).eval()\n"
    "ex = LayerExplorer(vit, ds)\n"
    "ex.widget",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_notebook(path: Path):
    nb = dict(nbformat=4, nbformat_minor=5,
              metadata=dict(kernelspec=dict(name="python3", display_name="Python 3", language="python")),
              cells=[dict(cell_type="code", id=f"c{i}", metadata={}, source=s, outputs=[], execution_count=None)
                     for i, s in enumerate(NOTEBOOK_SRC)])
    path.write_text(json.dumps(nb))


@contextlib.contextmanager
def running_jupyterlab(tmp_path: Path):
    "JupyterLab on 127.0.0.1 (random free port, random token) serving tmp_path; always stopped afterwards."
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / ".jcfg"), JUPYTER_RUNTIME_DIR=str(tmp_path / ".jrt"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / ".jws"), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    # in a venv with --system-site-packages the widget lab extension sits under the base prefix, which
    # Jupyter does not search by itself
    base = str(Path(sys.base_prefix) / "share" / "jupyter")
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [env.get("JUPYTER_PATH"), base]))
    env.pop("JUPYTER_TOKEN", None)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.open_browser=False",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--ServerApp.allow_remote_access=False", "--LabApp.extension_manager=readonly",
           "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0: cmd.append("--allow-root")
    log = open(tmp_path / "jupyterlab.log", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}: "
                                   f"{(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline: raise RuntimeError(f"jupyter lab did not answer on {url} within 90 s")
                time.sleep(0.5)
        yield url, token
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try: proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


@pytest.fixture
def jupyterlab(tmp_path):
    if shutil.which("jupyter") is None: pytest.skip("jupyter is not installed")
    with running_jupyterlab(tmp_path) as server: yield server


@pytest.mark.slow
def test_explorer_renders_in_jupyterlab_in_chromium(jupyterlab, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: the browser check needs a chromium binary, which pip cannot install; "
                    "get one with apt-get install chromium (Debian/Ubuntu, as root) — "
                    "Playwright drives it and downloads none")
    pw = pytest.importorskip("playwright.sync_api",
                             reason="the playwright python package is missing (pip install playwright)")
    url, token = jupyterlab
    _write_notebook(tmp_path / "explorer.ipynb")
    art = ROOT / "runs" / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=dict(width=1400, height=900))
            page.goto(f"{url}/lab/tree/explorer.ipynb?token={token}", wait_until="domcontentloaded", timeout=90_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            # JupyterLab exposes its app (--LabApp.expose_app_in_browser): wait for the notebook's kernel,
            # then run all cells
            page.wait_for_function("() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                                   " const k = w && w.sessionContext && w.sessionContext.session"
                                   " && w.sessionContext.session.kernel;"
                                   " return k && k.status === 'idle'; }", timeout=90_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            img = page.wait_for_selector(".jp-OutputArea-output .widget-image, .jp-OutputArea-output img",
                                         timeout=120_000)
            page.wait_for_function("el => el.complete && el.naturalWidth > 0 && el.naturalHeight > 0",
                                   arg=img, timeout=30_000)
            w, h = img.evaluate("el => [el.naturalWidth, el.naturalHeight]")
            assert w > 0 and h > 0
            # the controls are there too
            assert page.locator(".jp-OutputArea-output .widget-dropdown").count() >= 3
            page.screenshot(path=str(art / "layer_explorer.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(art / "layer_explorer_failed.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert (art / "layer_explorer.png").stat().st_size > 0


@pytest.mark.parametrize("kind", ["eva", "beit", "relpos", "vit_reg"])
def test_image_maps_every_family(kind):
    "LayerExplorer's maps on the other timm families: per-block GETAM sums to the fused map, which equals cams.getam."
    import torch
    from getam import cams, widgets
    from fixtures import tiny_backbone
    torch.manual_seed(0)
    model = tiny_backbone(kind).eval()
    x = torch.randn(3, 32, 32)
    out = widgets.image_maps(model, x)
    torch.testing.assert_close(torch.from_numpy(out["getam"]), cams.getam(model, x[None], torch.ones(1, 4))[0])
    torch.testing.assert_close(torch.from_numpy(out["per_layer"]).sum(0), torch.from_numpy(out["getam"]))
    assert out["a_cls"].shape == (3, 4, 4) and set(out["baselines"]) == set(widgets.BASELINES)
