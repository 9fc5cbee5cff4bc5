"""``report.html`` renders in a real browser: headless Chromium loads every image on the page.

The check copies the report beside itself with a small script added that, once the page has
loaded, records on ``<body>`` how many images there are and which did not decode
(``naturalWidth == 0``); Chromium's ``--dump-dom`` prints the page after that script ran.
Chromium comes from the Debian package ``chromium`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_analysis import linked_images, make_run_folder
from vitkit.analysis import analyze

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed: `apt-get install -y chromium` (Debian) to run this test",
)

CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((img) => !img.complete || img.naturalWidth === 0);
  document.body.setAttribute("data-image-check", JSON.stringify({
    images: images.length, broken: broken.map((img) => img.getAttribute("src")),
  }));
});
</script>
"""


def check_images_in_chromium(report: Path, profile: Path) -> dict[str, object]:
    """Open ``report`` (with the check script added) in headless Chromium; the check's result."""
    page = report.with_name("_image_check.html")
    page.write_text(report.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",  # let every image load before the DOM is dumped
        "--dump-dom",
        page.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r'data-image-check="([^"]*)"', result.stdout)
    assert found, f"the check did not run in Chromium; stderr:\n{result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    return analyze(make_run_folder(root / "run"), root / "out", num_images=2, distance_images=6)


def test_every_image_of_the_report_loads(report: Path, tmp_path: Path) -> None:
    result = check_images_in_chromium(report, tmp_path / "profile")
    assert result["broken"] == []
    assert result["images"] == len(linked_images(report)) == 8


def test_the_check_catches_a_missing_image(report: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(report.parent, broken)
    (broken / "attention-rollout.png").unlink()
    (broken / "embedding-filters.png").write_bytes(b"not a png")
    result = check_images_in_chromium(broken / report.name, tmp_path / "profile")
    assert sorted(result["broken"]) == ["attention-rollout.png", "embedding-filters.png"]
