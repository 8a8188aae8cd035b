"""tools/trace_screenshots.py: headless Chromium shoots the example offload trace in the bundled Perfetto UI;
the PNGs are at the fixed viewport's size and show something (many colours, no colour covering nearly all of
it, coloured slices drawn). The traced run the tool records by default is left out (the CLI's own tests cover it); this shoots
traces/example-offload.pftrace, a run made the same way.

Skipped only when no Chromium is installed, like tests/trace/test_viewer_browser.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image  # pillow comes with mistral-common

import tools.browser
from tools import trace_screenshots
from tools.browser import CHROMIUM

EXAMPLE = Path(__file__).resolve().parents[2] / "traces" / "example-offload.pftrace"


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
@pytest.mark.timeout(120)
def test_the_screenshots_are_at_the_viewport_size_and_not_blank(tmp_path):
    paths = trace_screenshots.shoot(EXAMPLE, tmp_path / "img")
    assert [p.name for p in paths] == [trace_screenshots.OVERLAP, trace_screenshots.STEP]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == trace_screenshots.VIEWPORT, (path.name, image.size)
            colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
        assert len(colours) > 200, (path.name, len(colours))  # slices, labels, arrows: hundreds of shades
        pixels = image.size[0] * image.size[1]
        commonest = max(count for count, _ in colours)
        assert commonest < 0.9 * pixels, (path.name, commonest)
        # The slices are the only saturated colours of the UI (grey chrome, dark text): with the tracks
        # collapsed or out of view this is 0; with them drawn, ~3% of the pixels.
        slices = sum(count for count, rgb in colours if max(rgb) - min(rgb) > 80)
        assert slices > 0.01 * pixels, (path.name, slices / pixels)


def test_without_chromium_it_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tools.browser, "CHROMIUM", None)
    assert trace_screenshots.main(["--trace", str(EXAMPLE), "--out", str(tmp_path)]) == 1
    assert "install chromium: apt-get install chromium" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
