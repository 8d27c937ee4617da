"""report.html in a real headless browser (Debian's Chromium driven by Playwright): the page loads, every image on it
shows, the console stays silent, nothing is asked of the network, and a hostile file name stays text."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from icnet_eval.cli import main
from icnet_eval.page import SAMPLES

# A file name that would be markup (an element with an id, an attribute break-out) if the page did not escape it.
HOSTILE = "<u id=\"hostile\" title='a'>x&amp;"  # no '/': it is one file name
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def _chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]' brings it; it drives the system Chromium)")
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium on this machine (Debian: apt-get install -y chromium; .ci/run installs it)")


def _scored_folder(root: Path, count: int) -> Path:
    """`icnet-eval score --out` over `count` synthetic predictions (no net needed); returns the --out folder."""
    rng = np.random.default_rng(3)
    lines = []
    for index in range(count):
        stem = f"{HOSTILE if index == 0 else 'city'}_{index:06d}_000019"
        label = np.repeat(np.arange(19, dtype=np.uint8), 7)[None, :128].repeat(64, axis=0)
        label[56:] = 255
        prediction = np.where(rng.random(label.shape) < 0.3 + 0.05 * index, label, 0).astype(np.uint8)
        image = rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)
        for path, array in ((root / "img" / f"{stem}_leftImg8bit.png", image),
                            (root / "gt" / f"{stem}_gtFine_labelTrainIds.png", label),
                            (root / "pred" / f"{stem}_leftImg8bit.png", prediction)):
            path.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(path), array)
        lines.append(f"img/{stem}_leftImg8bit.png\tgt/{stem}_gtFine_labelTrainIds.png")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    out = root / "report"
    result = CliRunner().invoke(main, ["score", "--list", str(root / "list.txt"), "--data-root", str(root),
                                       "--pred-dir", str(root / "pred"), "--out", str(out), "--format", "trainids"])
    assert result.exit_code == 0, result.output
    return out


def test_the_report_page_in_a_headless_browser(tmp_path):
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    count = 2 * SAMPLES + 2  # more than are shown with thumbnails: the worst and the best only
    out = _scored_folder(tmp_path, count)
    messages, errors, requests = [], [], []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = context.new_page()
            page.on("console", lambda message: messages.append(f"{message.type}: {message.text}"))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto((out / "report.html").as_uri(), wait_until="load", timeout=60_000)
            shown = page.evaluate("""() => Array.from(document.images).map(image => ({
                complete: image.complete, width: image.naturalWidth, shown: image.getBoundingClientRect().width}))""")
            hostile = page.evaluate("() => document.getElementById('hostile')")
            text = page.evaluate("() => document.body.innerText")
            title = page.title()
        finally:
            context.close()
    assert messages == [] and errors == []
    assert all(url.startswith(("data:", "file:")) for url in requests), requests
    assert len(shown) == 2 + 4 * 2 * SAMPLES  # two charts; image, ground truth, prediction and errors of each
    assert all(image["complete"] and image["width"] > 0 and image["shown"] > 0 for image in shown), shown
    assert hostile is None and f"{HOSTILE}_000000_000019_leftImg8bit.png" in text
    assert title.startswith("ICNet evaluation: mIoU ") and "Every image, worst first" in text
