"""``python -m sd_dmd.app`` in a real headless browser: Debian's chromium and chromium-driver, driven by Selenium.

The app runs as a subprocess on 127.0.0.1 (a free port) with the tiny pipeline as the teacher and a tiny LoRA as the
student; the test types a prompt, clicks Generate, waits for both images and checks that they are not blank and
differ. It skips (with the reason) only when no chromium or chromedriver is found: .ci/run installs them.

Run as a script, the same code takes the screenshot of docs/app.png (digits teacher, `make demo`'s LoRA):

    .venv/bin/python tests/test_app_browser.py --lora demo_out/run/final --out docs/app.png
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
WINDOW = (1280, 900)
PROMPT = "a blue sphere"


def _find(names, extra=()):
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    return next((p for p in extra if Path(p).is_file()), None)


def find_browser() -> tuple[str | None, str | None]:
    return (_find(BROWSERS, ["/usr/lib/chromium/chromium"]),
            _find(DRIVERS, ["/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, lora: str, port: int, *extra: str, log=None) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    return subprocess.Popen([sys.executable, "-m", "sd_dmd.app", "--model", model, "--lora", lora, "--port", str(port),
                             "--prompt", "", *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until_serving(proc: subprocess.Popen, url: str, timeout: float, log_path: Path | None = None) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}:\n"
                                 f"{log_path.read_text()[-3000:] if log_path else ''}")
        try:
            if opener.open(url, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not serve {url} in {timeout:.0f} s:\n"
                         f"{log_path.read_text()[-3000:] if log_path else ''}")


def open_browser(browser: str, driver_path: str, profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        opts.add_argument(flag)
    # both paths given: Selenium Manager (which would download a driver) is not needed
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))


def read_img(el, base_url: str):
    """The PIL image an <img> shows: its data: URL decoded, or its file fetched from the app."""
    from PIL import Image

    src = el.get_attribute("src")
    if src.startswith("data:"):
        data = base64.b64decode(src.split(",", 1)[1])
    else:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        data = opener.open(urllib.request.Request(src if "://" in src else base_url.rstrip("/") + "/" + src),
                           timeout=30).read()
    return Image.open(io.BytesIO(data)).convert("RGB")


def click_generate(drv, url: str, prompt: str, timeout: float = 120.0):
    """Load the page, type ``prompt``, click Generate; return (teacher image, student image, the two time texts)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    drv.get(url)
    wait = WebDriverWait(drv, timeout)
    box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea, #prompt input")))
    box.clear()
    box.send_keys(prompt)
    button = drv.find_element(By.CSS_SELECTOR, "#generate")
    if button.tag_name != "button":
        button = button.find_element(By.CSS_SELECTOR, "button")
    button.click()

    def done(d):
        texts = [d.find_element(By.CSS_SELECTOR, f"#{k}_ms").text for k in ("teacher", "student")]
        imgs = [d.find_elements(By.CSS_SELECTOR, f"#{k} img") for k in ("teacher", "student")]
        if all(" ms" in t for t in texts) and all(i and i[0].get_attribute("src") for i in imgs):
            return imgs[0][0], imgs[1][0], texts
        return False

    t_el, s_el, texts = wait.until(done)
    time.sleep(0.5)  # let the images finish painting before a screenshot
    return read_img(t_el, url), read_img(s_el, url), texts


def screenshot(drv, path: Path) -> None:
    height = drv.execute_script("return document.documentElement.scrollHeight")
    drv.set_window_size(WINDOW[0], min(max(WINDOW[1], int(height) + 40), 2000))
    time.sleep(0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    drv.save_screenshot(str(path))


def check_images(teacher, student) -> None:
    import numpy as np

    t, s = (np.asarray(im, dtype=np.float32) for im in (teacher, student))
    assert t.shape == s.shape and min(t.shape[:2]) >= 64, (t.shape, s.shape)  # the enlarged 2x2 grid
    assert t.std() > 5 and s.std() > 5, (t.std(), s.std())  # not blank
    assert np.abs(t - s).mean() > 2, np.abs(t - s).mean()  # teacher and student differ


@pytest.fixture(scope="module")
def browser():
    b, d = find_browser()
    if not (b and d):
        pytest.skip("no headless browser: needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as e:
        pytest.fail(f"{e}: the app extra is missing (pip install -e '.[app,test]' -c constraints.txt; make test "
                    "installs it)")
    return b, d


def test_app_in_a_headless_browser(browser, tiny_pipe_dir, tmp_path):
    from test_app import make_lora

    lora = make_lora(tiny_pipe_dir, tmp_path / "run" / "final")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = tmp_path / "app.log"
    with open(log_path, "wb") as log:
        proc = start_app(tiny_pipe_dir, str(lora), port, "--teacher_steps", "10", log=log)
        drv = None
        try:
            wait_until_serving(proc, url, 180, log_path)
            drv = open_browser(*browser, str(tmp_path / "profile"))
            teacher, student, texts = click_generate(drv, url, PROMPT)
            check_images(teacher, student)
            assert all("for 4 images" in t for t in texts) and "faster" in texts[1], texts
            shot = tmp_path / "app.png"
            screenshot(drv, shot)
            from PIL import Image

            assert Image.open(shot).size[0] >= 800  # the page, not an empty frame
        finally:
            if drv is not None:
                drv.quit()
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv=None):
    """Screenshot of the app for the docs: the digits teacher and a LoRA (default: make demo's)."""
    import argparse

    from sd_dmd.data.digits import TEACHER_DIR

    p = argparse.ArgumentParser(description="a screenshot of python -m sd_dmd.app after one click")
    p.add_argument("--model", default=str(TEACHER_DIR))
    p.add_argument("--lora", default=str(ROOT / "demo_out" / "run" / "final"))
    p.add_argument("--prompt", default="a handwritten digit seven")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "app.png")
    args = p.parse_args(argv)
    browser, driver_path = find_browser()
    if not (browser and driver_path):
        raise SystemExit("no chromium / chromedriver: apt-get install -y chromium chromium-driver")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "app.log"
        with open(log_path, "wb") as log:
            proc = start_app(args.model, args.lora, port, log=log)
            try:
                wait_until_serving(proc, url, 300, log_path)
                drv = open_browser(browser, driver_path, str(Path(tmp) / "profile"))
                try:
                    click_generate(drv, url, args.prompt, timeout=300)  # a first click: the times settle
                    teacher, student, texts = click_generate(drv, url, args.prompt, timeout=300)
                    check_images(teacher, student)
                    screenshot(drv, args.out)
                finally:
                    drv.quit()
            finally:
                proc.terminate()
                proc.wait(timeout=20)
    print(f"wrote {args.out} ({texts[0]} | {texts[1]})")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
