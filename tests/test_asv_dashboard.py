"""The ``asv publish`` dashboard opens in a real browser and draws the benchmark graphs.

The results of tests/test_regress.py's throwaway repository (three commits measured by the
real asv) are published, made to work offline with scripts/asv_offline.py (asv's page loads
jQuery/flot from CDNs, which CI cannot reach), served on 127.0.0.1 and loaded in headless
Chromium.  A screenshot of the graph page is saved (and copied to ``$DSGD_ARTIFACTS`` when
set); the DOM after the page's scripts ran must hold flot's plot canvases and a legend.

Needs Debian's ``chromium`` and the JS packages (.ci installs them):
    apt-get install -y --no-install-recommends chromium libjs-jquery libghc-js-flot-data \\
        libjs-bootstrap libjs-jquery-stupidtable node-blueimp-md5
and skips cleanly without them.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_regress import ROOT, tiny_results  # noqa: F401  (the session fixture: asv results of 3 commits)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                # nothing but 127.0.0.1 resolves: the page cannot reach out, whatever it references
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--virtual-time-budget=20000", "--window-size=1280,900"]
GRAPH = "bench_work.Scaled.time_scaled"


def _browser():
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium: apt-get install -y --no-install-recommends chromium")


def _load_offline():
    spec = importlib.util.spec_from_file_location("dsgd_asv_offline", ROOT / "scripts" / "asv_offline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def served_dashboard(tiny_results):  # noqa: F811
    browser = _browser()
    p = tiny_results.run(sys.executable, "-m", "asv", "publish", timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    html = tiny_results.repo / ".asv" / "html"
    assert (html / "index.html").is_file()
    done, missing = _load_offline().vendor(html)
    if missing:
        pytest.skip("no local copies of asv's JS dependencies " + ", ".join(u.rsplit("/", 1)[1] for u in missing) +
                    ": apt-get install -y libjs-jquery libghc-js-flot-data libjs-bootstrap "
                    "libjs-jquery-stupidtable node-blueimp-md5")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield browser, f"http://127.0.0.1:{server.server_address[1]}/index.html"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _chrome(browser, tmp_path, *args, timeout=90):
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # a fresh profile per call
    return subprocess.run([browser, *CHROME_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout)


def _colored_pixels(png: Path, box) -> int:
    """Pixels in ``box`` (x0, y0, x1, y1) that are not grey: the plotted lines."""
    try:
        import matplotlib.image as mpimg
    except ImportError:
        pytest.skip("matplotlib is needed to read the screenshot")
    img = mpimg.imread(str(png))[..., :3]
    x0, y0, x1, y1 = box
    region = img[y0:y1, x0:x1]
    spread = region.max(axis=-1) - region.min(axis=-1)
    return int((spread > 0.2).sum())


def test_graph_page_renders_in_chromium(served_dashboard, tmp_path):
    browser, url = served_dashboard
    page = f"{url}#{GRAPH}"

    dom = _chrome(browser, tmp_path, "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "Can not determine continental origin" not in html, "asv's JS dependencies failed to load"
    assert 'id="main-graph"' in html
    assert html.count('class="flot-base"') >= 1, "no flot canvas: the graph was not drawn"
    assert html.count('class="legendLabel"') >= 2  # one series per parameter value (scale 1, 2)
    assert "scale-1" in html and "scale-2" in html

    shot = tmp_path / "asv_dashboard_graph.png"
    r = _chrome(browser, tmp_path, f"--screenshot={shot}", page)
    assert r.returncode == 0 and shot.is_file() and shot.stat().st_size > 5000, r.stderr[-2000:]
    artifacts = os.environ.get("DSGD_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
    # The plot area (right of the side bar, below the nav bar) holds the coloured series lines.
    assert _colored_pixels(shot, (230, 90, 1260, 780)) > 300, f"blank graph in {shot}"


def test_summary_grid_lists_the_benchmarks(served_dashboard, tmp_path):
    browser, url = served_dashboard
    dom = _chrome(browser, tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for name in ("bench_work.Work.time_work", "bench_work.Scaled.time_scaled", "bench_work.Scaled.track_calls"):
        assert name in dom.stdout
