"""rsam-ui (rsam/tools/ui.py): the request handler, the limits, the CLI's usage errors, and the page in a real
headless browser.

Unit part (no browser, no server): Segmenter.run on an image with two expressions returns an overlay picture,
one table row and one mask PNG per expression (the PNG equal to the predictor's mask); a second request on the
same image reuses its features; too many expressions / characters / pixels, no image and no text are refused
with a message; the page's callback turns a refusal (a file that is not an image included) into one readable
message box, cleared outputs and one log line, never the server's temporary paths; an empty mask says "empty
mask" in the table and the caption; mask colours stand out on the object they cover; main exits 2 with one line
for a missing checkpoint, an unavailable device and a missing examples folder; pretrained directories load
through from_pretrained. (rsam-ui as a process: tests/test_ui_process.py.)

Browser part: a tiny random checkpoint (64 px network) served on 127.0.0.1 at a free port; headless Debian
chromium driven by selenium uploads an image through the page's file input, types an expression, clicks
Segment and waits for the output image and the scores table; the table must show the expression and a numeric
IoU. Then a text file named like a PNG (one message box naming it, no temporary path, no "Error" badge), an
expression whose mask is empty ("empty mask") and a fill overlay on the red object of the scene. The screenshots
are saved under tmp_path and copied to /tmp/rsam_ui_*.png. Skipped, with the reason, where gradio, selenium,
chromium or chromedriver is missing (``make ui-test`` installs them).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from rsam.predictor import RSAMPredictor
from rsam.tools import ui, ui_app
from tiny_rsam_setup import tiny_checkpoint

TEXTS = "the red ship\nthe largest white building"
SCREENSHOT_COPY = "/tmp/rsam_ui_screenshot.png"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    _, _, ckpt = tiny_checkpoint(tmp)
    return {"tmp": tmp, "ckpt": ckpt}


@pytest.fixture(scope="module")
def predictor(setup):
    return RSAMPredictor.from_checkpoint(setup["ckpt"], device="cpu")


@pytest.fixture(scope="module")
def scene_dir(setup):
    """Two synthetic scenes (128 px) as example images, each with a <stem>.txt of its expressions."""
    from rsam.data.synthetic import make_scene

    out = setup["tmp"] / "examples"
    out.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        image, _, _, records = make_scene(rng, 128)
        Image.fromarray(image).save(out / f"scene_{i}.png")
        (out / f"scene_{i}.txt").write_text("\n".join(r[0] for r in records[:2]) + "\n", encoding="utf-8")
    return out


def _image(h=45, w=75, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ unit


def test_run_two_expressions(predictor, tmp_path):
    seg = ui.Segmenter(predictor, out_dir=str(tmp_path / "out"))
    image = _image()
    result = seg.run(image, TEXTS + "\n\n", style="Outline")
    assert isinstance(result.overlay, Image.Image) and result.overlay.width >= 75
    assert [r["expression"] for r in result.rows] == TEXTS.splitlines()
    assert len(result.files) == 2
    predictor.set_image(image)
    expected = predictor.predict(TEXTS.splitlines())
    for row, path, p in zip(result.rows, result.files, expected):
        assert os.path.isfile(path) and path.endswith(".png")
        png = np.asarray(Image.open(path))
        assert png.shape == (45, 75) and set(np.unique(png)) <= {0, 255}
        assert np.array_equal(png == 255, p.mask.numpy())
        assert row["iou_pred"] == pytest.approx(p.iou_pred) and row["no_target"] == p.no_target
        assert re.fullmatch(r"#[0-9a-f]{6}", row["color"]) and row["area_px"] == int(p.mask.sum())
    assert result.rows[0]["color"] != result.rows[1]["color"]
    if ui.Segmenter.side_by_side_available():  # input beside the overlay: twice as wide (+ a gap)
        wide = seg.run(image, TEXTS, style="Fill", side_by_side=True).overlay
        assert wide.width > result.overlay.width

    table = ui.scores_html(result.rows + [dict(result.rows[0], index=3, expression="<b>x</b> & y")])
    assert table.count("<tr>") == 4  # header + 3 rows
    assert "&lt;b&gt;x&lt;/b&gt; &amp; y" in table and "<b>x</b>" not in table  # user text escaped


def test_same_image_reuses_features(predictor, tmp_path, monkeypatch):
    path = tmp_path / "scene.png"
    Image.fromarray(_image(40, 52, seed=1)).save(path)
    seg = ui.Segmenter(predictor, out_dir=str(tmp_path / "out"))
    calls = []
    original = predictor.set_image
    monkeypatch.setattr(predictor, "set_image", lambda im: (calls.append(im), original(im)))
    first = seg.run(str(path), "the red ship")
    second = seg.run(str(path), "the red ship\na vehicle")
    assert len(calls) == 1
    assert first.rows[0]["iou_pred"] == second.rows[0]["iou_pred"] and len(second.files) == 2
    seg.run(_image(40, 52, seed=2), "the red ship")
    assert len(calls) == 2


def test_limits_refused_with_a_message(predictor, tmp_path):
    seg = ui.Segmenter(predictor, ui.Limits(max_pixels=1000, max_expressions=2, max_chars=20),
                       out_dir=str(tmp_path / "out"))
    small = _image(20, 30)
    with pytest.raises(ui.UIError, match="3 expressions: at most 2"):
        seg.run(small, "a\nb\nc")
    with pytest.raises(ui.UIError, match="expression 2 has 25 characters: at most 20"):
        seg.run(small, "the ship\n" + "x" * 25)
    with pytest.raises(ui.UIError, match="75 x 45 = 0.0 megapixels: at most 0.001 megapixels"):
        seg.run(_image(), "the ship")
    big = tmp_path / "big.png"
    Image.fromarray(_image(40, 40)).save(big)
    with pytest.raises(ui.UIError, match="40 x 40"):
        seg.run(str(big), "the ship")
    with pytest.raises(ui.UIError, match="type at least one expression"):
        seg.run(small, " \n ")
    with pytest.raises(ui.UIError, match="upload an image"):
        seg.run(None, "the ship")
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"hello")
    with pytest.raises(ui.UIError, match="this file is not an image we can read: not_an_image.png"):
        seg.run(str(bad), "the ship")
    assert seg.run(small, "the ship\na vehicle").files  # within the limits: fine


def test_callback_shows_refusals_in_the_page(predictor, tmp_path, caplog):
    seg = ui.Segmenter(predictor, ui.Limits(max_expressions=1), out_dir=str(tmp_path / "out"))
    with caplog.at_level("INFO", logger="rsam.ui"):
        overlay, table, files, message = seg(_image(), TEXTS, "Fill", False)
    assert (overlay, table, files) == (None, "", None)
    assert "2 expressions: at most 1" in message and 'role="alert"' in message
    assert [r.getMessage() for r in caplog.records] == ["refused request: 2 expressions: at most 1 per request"]
    assert caplog.records[0].exc_info is None  # one line, no traceback
    overlay, table, files, message = seg(_image(), "the red ship", "Fill", False)
    assert isinstance(overlay, Image.Image) and "the red ship" in table and len(files) == 1 and message == ""


def _upload(tmp_path, name: str, data: bytes) -> dict:
    """What the page hands the callback for an upload: Gradio's payload, the file under a server folder."""
    folder = tmp_path / "gradio-upload" / "0123abcd"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return {"path": str(folder / name), "orig_name": name, "url": None, "meta": {"_type": "gradio.FileData"}}


def test_unreadable_upload_is_one_readable_message(predictor, tmp_path, caplog):
    seg = ui.Segmenter(predictor, out_dir=str(tmp_path / "out"))
    png = tmp_path / "scene.png"
    Image.fromarray(_image(40, 52)).save(png)
    truncated = png.read_bytes()[:120]  # a PNG header and the start of its data
    for name, data in (("notes.png", b"these are my notes, not a picture\n"), ("cut.png", truncated)):
        caplog.clear()
        with caplog.at_level("INFO", logger="rsam.ui"):
            overlay, table, files, message = seg(_upload(tmp_path, name, data), "the red ship", "Fill", False)
        assert (overlay, table, files) == (None, "", None)
        assert f"this file is not an image we can read: {name} (" in message, message
        assert str(tmp_path) not in message and "gradio-upload" not in message and "0123abcd" not in message
        assert "Traceback" not in message and len(caplog.records) == 1 and caplog.records[0].exc_info is None
        assert str(tmp_path) not in caplog.records[0].getMessage()
    overlay, table, files, message = seg(_upload(tmp_path, "fine.png", png.read_bytes()), "the red ship", "Fill",
                                         False)
    assert message == "" and "the red ship" in table and len(files) == 1


class _EmptyMasks:
    """The predictor, except that expressions containing "nothing" get an empty mask with a positive object
    score (the model found something, but no pixel passed the mask threshold)."""

    def __init__(self, predictor):
        self.inner = predictor

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, texts):
        import dataclasses

        out = []
        for p in self.inner.predict(texts):
            if "nothing" in p.text:
                p = dataclasses.replace(p, mask=torch.zeros_like(p.mask), no_target=False, object_score=1.5)
            out.append(p)
        return out


def test_empty_mask_says_so(predictor, tmp_path):
    seg = ui.Segmenter(_EmptyMasks(predictor), out_dir=str(tmp_path / "out"))
    result = seg.run(_image(), "the red ship\nnothing like this")
    row = result.rows[1]
    assert row["area_px"] == 0 and not row["no_target"] and row["result"] == "empty mask"
    table = ui.scores_html(result.rows)
    assert '<td class="result">empty mask</td>' in table
    assert ui_app._detail(seg.predictor.predict(["nothing"])[0], 0).startswith("empty mask")
    assert ui_app._outcome(True, 0) == "no target" and ui_app._outcome(False, 12) == "found"


def test_mask_colours_stand_out_on_the_object(predictor, tmp_path, scene_dir):
    """A fill over a red object is not red: the table's colour is far from the object's own."""
    from rsam.data.synthetic import make_scene

    image, masks, objs, _ = _red_scene(make_scene)
    k = next(i for i, o in enumerate(objs) if o.colour == "red")

    class Truth(_EmptyMasks):
        def predict(self, texts):
            import dataclasses

            return [dataclasses.replace(p, mask=torch.from_numpy(masks[k]), no_target=False)
                    for p in self.inner.predict(texts)]

    seg = ui.Segmenter(Truth(predictor), out_dir=str(tmp_path / "out"))
    row = seg.run(image, "the red object", style="Fill").rows[0]
    colour = np.array([int(row["color"][i:i + 2], 16) for i in (1, 3, 5)])
    red = np.median(image[masks[k]], axis=0)
    assert np.abs(colour - red).sum() > 300, (row["color"], red)


def _red_scene(make_scene):
    """A 128 px synthetic scene with a red object (the first seed that has one)."""
    for seed in range(100):
        image, masks, objs, records = make_scene(np.random.default_rng(seed), 128)
        if any(o.colour == "red" for o in objs):
            return image, masks, objs, records
    raise AssertionError("no synthetic scene with a red object")


def _usage_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_main_usage_errors(setup, tmp_path, capsys):
    assert ui.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    err = _usage_line(capsys)
    assert "missing.pt" in err
    assert ui.main(["--checkpoint", str(setup["ckpt"]), "--examples", str(tmp_path / "nowhere")]) == 2
    _usage_line(capsys)
    import torch

    if not torch.cuda.is_available():
        assert ui.main(["--checkpoint", str(setup["ckpt"]), "--device", "cuda"]) == 2
        err = _usage_line(capsys)
        assert "cuda" in err.lower()
    assert ui.main(["--checkpoint", str(setup["ckpt"]), "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in _usage_line(capsys)
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    assert ui.main(["--checkpoint", str(bad), "--device", "cpu"]) == 2
    _usage_line(capsys)


def test_main_loads_once_and_serves_locally(setup, scene_dir, monkeypatch):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[ui]')")
    loads, launched = [], []
    original = RSAMPredictor.from_checkpoint.__func__

    def counting(cls, *args, **kwargs):
        loads.append(kwargs.get("device"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(RSAMPredictor, "from_checkpoint", classmethod(counting))
    monkeypatch.setattr(ui, "launch", lambda app, host, port, share=False: launched.append((app, host, port, share)))
    assert ui.main(["--checkpoint", str(setup["ckpt"]), "--device", "cpu", "--port", "7999",
                    "--examples", str(scene_dir)]) == 0
    assert len(loads) == 1 and str(loads[0]) == "cpu"
    app, host, port, share = launched[0]
    assert (host, port, share) == ("127.0.0.1", 7999, False)
    assert app.rsam_allowed_paths == [str(scene_dir.resolve())]
    assert app.rsam_limits == ui.Limits()


def test_load_predictor_forms(setup, predictor, tmp_path):
    assert isinstance(ui.load_predictor(str(setup["ckpt"]), device="cpu"), RSAMPredictor)
    if not hasattr(predictor, "save_pretrained"):
        pytest.skip("RSAMPredictor.save_pretrained is not available")
    directory = tmp_path / "pretrained"
    predictor.save_pretrained(directory)
    loaded = ui.load_predictor(str(directory), device="cpu")
    loaded.set_image(_image())
    predictor.set_image(_image())
    a, b = loaded.predict(["the red ship"])[0], predictor.predict(["the red ship"])[0]
    assert np.array_equal(a.mask.numpy(), b.mask.numpy())
    with pytest.raises(ui._Usage, match="--config"):
        ui.load_predictor(str(directory), config="x.yaml", device="cpu")


# ------------------------------------------------------------------------------------------------ browser


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _browser_or_skip():
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[ui]'; make ui-test)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium; make ui-test)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no headless browser: chromium and chromedriver must be on PATH "
                    "(apt-get install -y chromium chromium-driver; make ui-test)")
    return chromium, driver


class _Scripted(_EmptyMasks):
    """The predictor with two scripted answers for the browser test: "the red object" -> the red object's
    true mask (a fill over it shows its colour), "nothing ..." -> an empty mask with a positive object score."""

    def __init__(self, predictor, red_mask: np.ndarray):
        super().__init__(predictor)
        self.red = torch.from_numpy(red_mask)

    def predict(self, texts):
        import dataclasses

        out = super().predict(texts)
        return [dataclasses.replace(p, mask=self.red.clone(), no_target=False, object_score=2.0)
                if p.text == "the red object" and tuple(p.mask.shape) == tuple(self.red.shape) else p for p in out]


def _segment(browser, wait, base: str, image, texts: str, style: str) -> None:
    """A fresh page: upload ``image``, type ``texts``, pick ``style``, press Segment."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    browser.get(base + "/")
    upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#rsam-input input[type=file]")))
    upload.send_keys(str(image))
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#rsam-input img")))
    box = browser.find_element(By.CSS_SELECTOR, "#rsam-texts textarea")
    box.clear()
    box.send_keys(texts)
    browser.find_element(By.CSS_SELECTOR, f"#rsam-style input[value={style}]").click()
    browser.find_element(By.CSS_SELECTOR, "#rsam-segment").click()


def _screenshot(browser, tmp_path, name: str) -> None:
    time.sleep(0.5)  # let the page paint
    assert browser.save_screenshot(str(tmp_path / name))
    shutil.copyfile(tmp_path / name, f"/tmp/{name}")


def test_browser_upload_segment_screenshot(predictor, scene_dir, tmp_path):
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    examples = ui.find_examples(str(scene_dir))
    assert len(examples) == 2 and examples[0][1]
    from rsam.data.synthetic import make_scene

    red_image, red_masks, red_objects, _ = _red_scene(make_scene)
    red = red_masks[next(i for i, o in enumerate(red_objects) if o.colour == "red")]
    Image.fromarray(red_image).save(tmp_path / "red_scene.png")
    app = ui.build_app(_Scripted(predictor, red), examples, out_dir=str(tmp_path / "out"))
    port = _free_port()
    ui.launch(app, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    assert app.share is False and app.server_name == "127.0.0.1"
    assert app.max_file_size == ui.Limits().max_file_bytes
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1300", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    shot = tmp_path / "rsam_ui.png"
    expression = "the red ship at the top left"
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 120)
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#rsam-input input[type=file]")))
        upload.send_keys(str(scene_dir / "scene_0.png"))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#rsam-input img")))  # upload finished
        box = browser.find_element(By.CSS_SELECTOR, "#rsam-texts textarea")
        box.clear()
        box.send_keys(expression)
        browser.find_element(By.CSS_SELECTOR, "#rsam-segment").click()
        cell = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#rsam-scores td.expression")))
        overlay = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#rsam-overlay img")))
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
        assert cell.text == expression
        iou = browser.find_element(By.CSS_SELECTOR, "#rsam-scores td.iou").text
        assert 0.0 <= float(iou) <= 1.0
        score = browser.find_element(By.CSS_SELECTOR, "#rsam-scores td.object-score").text
        float(score)
        assert overlay.get_attribute("src")
        assert browser.execute_script("return arguments[0].naturalWidth", overlay) >= 128
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#rsam-files a, #rsam-files td")))
        assert ".png" in browser.find_element(By.CSS_SELECTOR, "#rsam-files").text
        time.sleep(0.5)  # let the image paint before the screenshot
        assert browser.save_screenshot(str(shot))
        shutil.copyfile(shot, SCREENSHOT_COPY)

        # An example (from --examples, with its <stem>.txt): two expressions -> two rows, two mask files.
        browser.find_element(By.CSS_SELECTOR, "#rsam-examples tbody tr:nth-child(2)").click()
        wanted = examples[1][1]
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#rsam-texts textarea").get_attribute("value")
                   == wanted)
        browser.find_element(By.CSS_SELECTOR, "#rsam-style input[value=Fill]").click()
        browser.find_element(By.CSS_SELECTOR, "#rsam-segment").click()
        wait.until(lambda d: [c.text for c in d.find_elements(By.CSS_SELECTOR, "#rsam-scores td.expression")]
                   == wanted.splitlines())
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#rsam-files").text.count(".png") == 2)
        time.sleep(0.5)
        browser.save_screenshot(str(tmp_path / "rsam_ui_example.png"))
        shutil.copyfile(tmp_path / "rsam_ui_example.png", "/tmp/rsam_ui_screenshot_example.png")

        # Offline: every resource the page loaded came from the local server (no CDN, no fonts from the web).
        urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        base = f"http://127.0.0.1:{port}"
        outside = [u for u in urls if not u.startswith((base, "data:", "blob:"))]
        assert urls and not outside, outside

        # A text file named like a picture: one readable message naming it, no temporary path, no "Error" badge.
        notes = tmp_path / "notes.png"
        notes.write_bytes(b"my notes, not a picture\n")
        _segment(browser, wait, base, notes, "the red ship", "Outline")
        box = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#rsam-message .rsam-message")))
        assert box.text == "this file is not an image we can read: notes.png (not a picture format we know " \
                           "(PNG, JPEG, TIFF, BMP, WebP))", box.text
        page = browser.find_element(By.TAG_NAME, "body").text
        assert "/tmp" not in page and str(tmp_path) not in page and "Traceback" not in page
        assert "Error" not in page.split(), page
        _screenshot(browser, tmp_path, "rsam_ui_error.png")

        # The red object filled (the colour is not red), and an expression whose mask is empty says so.
        _segment(browser, wait, base, tmp_path / "red_scene.png", "the red object\nnothing at all", "Fill")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rsam-scores td.result")) == 2)
        results = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#rsam-scores td.result")]
        areas = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#rsam-scores td.area")]
        assert results == ["found", "empty mask"] and areas == [str(int(red.sum())), "0"], (results, areas)
        assert browser.find_element(By.CSS_SELECTOR, "#rsam-message").text == ""
        overlay = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#rsam-overlay img")))
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
        _screenshot(browser, tmp_path, "rsam_ui_fill_red.png")
    except Exception:
        browser.save_screenshot(str(tmp_path / "failure.png"))
        shutil.copyfile(tmp_path / "failure.png", "/tmp/rsam_ui_failure.png")
        with open("/tmp/rsam_ui_failure.html", "w", encoding="utf-8") as f:
            f.write(browser.page_source)
        raise
    finally:
        browser.quit()
        app.close()
    assert Image.open(shot).size[0] >= 1000
