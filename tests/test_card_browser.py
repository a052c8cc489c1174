"""The demo's data card in a real headless browser (Chromium from apt): every image loads, the numbers shown
equal the stage stats, and a screenshot is not blank."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60));
  const out = document.createElement('pre');
  out.id = 'cidistill-check';
  out.textContent = JSON.stringify({images: imgs.length, broken: bad});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("no Chromium found: `.ci/run` installs it (apt-get install chromium); install it to run this test")


def _browser(*args) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-extensions", "--virtual-time-budget=10000"]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


def test_card_renders_in_headless_chromium(small_run, tmp_path):
    card = Path(small_run.stage_dir("card")) / "card.html"
    page = tmp_path / "card.html"
    page.write_text(card.read_text().replace("</body>", CHECK + "</body>"))
    dom = _browser("--dump-dom", page.as_uri()).stdout
    m = re.search(r'<pre id="cidistill-check">(.*?)</pre>', dom, re.S)
    assert m, "the page did not finish loading in Chromium"
    check = json.loads(m.group(1).replace("&quot;", '"'))
    assert check["images"] >= 6 and check["broken"] == []

    # the numbers a reader sees are the stage stats
    text = re.sub(r"<[^>]+>", " ", dom)
    bal = json.loads((Path(small_run.stage_dir("balance")) / "stats.json").read_text())
    dl = json.loads((Path(small_run.stage_dir("download")) / "stats.json").read_text())
    for n in (bal["kept"], dl["successes"], *[v for v in bal["removed_by_rule"].values() if v]):
        assert re.search(rf"\b{n:,}\b", text), n

    shot = tmp_path / "card.png"
    _browser(f"--screenshot={shot}", "--window-size=1200,2000", card.as_uri())
    from PIL import Image

    im = Image.open(shot).convert("L")
    lo, hi = im.getextrema()
    assert im.size == (1200, 2000) and hi - lo > 100  # something was drawn
