#!/usr/bin/env python
"""Make an ``asv publish`` dashboard work without internet access.

asv's ``index.html`` loads jQuery, flot, bootstrap, stupidtable and md5 from public CDNs;
on a machine that cannot reach them (CI, a cluster) the page stays empty.  This copies local
copies of those files into ``<html_dir>/vendor/`` and points ``index.html`` at them.

    python scripts/asv_offline.py [.asv/html]

Local copies come from Debian packages (``apt-get install libjs-jquery libghc-js-flot-data
libjs-bootstrap libjs-jquery-stupidtable node-blueimp-md5``: flot 0.8.3, the version asv
uses, is in libghc-js-flot-data) or any directory given with ``--search``.  A file with no
local copy keeps its CDN address and is listed; the exit status is then 1 (0 when every
file was replaced).  Running it twice is harmless.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable, Optional

SEARCH = ("/usr/share/javascript", "/usr/share/haskell-js-flot", "/usr/share/nodejs")
# Optional plugins: nothing the line graphs need (bar ordering of category plots).
OPTIONAL = {"jquery.flot.orderBars.js"}
_TAG = re.compile(r"<(?:script|link)\b[^>]*>")
_URL = re.compile(r'(?P<attr>src|href)="(?P<url>https?://[^"]+\.(?:js|css))"')
# Subresource-integrity hashes name the CDN's bytes: a local copy has other bytes.
_SRI = re.compile(r'\s(?:integrity|crossorigin|referrerpolicy)(?:="[^"]*")?')


def _candidates(name: str) -> list[str]:
    """File names that may hold ``name`` locally (Debian drops version numbers)."""
    names = [name]
    m = re.match(r"(jquery)-[\d.]+(\.min)?\.js$", name)
    if m:
        names.append(f"jquery{m.group(2) or ''}.js")
    if name.endswith(".min.js"):
        names.append(name[:-7] + ".js")
    if name.endswith(".min.css"):
        names.append(name[:-8] + ".css")
    return names


def find_local(name: str, search: Iterable[str | Path]) -> Optional[Path]:
    for cand in _candidates(name):
        for root in search:
            root = Path(root)
            if not root.is_dir():
                continue
            hits = sorted(root.rglob(cand), key=lambda p: (len(p.parts), str(p)))
            hits = [h for h in hits if "/tests/" not in str(h) and h.is_file()]
            if hits:
                return hits[0]
    return None


def vendor(html_dir: str | Path, search: Iterable[str | Path] = SEARCH) -> tuple[dict, list]:
    """Rewrite ``index.html``; returns ``({url: local path}, [urls left on the CDN])``."""
    html_dir = Path(html_dir)
    index = html_dir / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"{index} does not exist: run `asv publish` first")
    text = index.read_text()
    out = html_dir / "vendor"
    out.mkdir(exist_ok=True)
    done, missing = {}, []

    def tag(m: re.Match) -> str:
        t = m.group(0)
        new = _URL.sub(sub, t)
        return _SRI.sub("", new) if new != t else t

    def sub(m: re.Match) -> str:
        url = m.group("url")
        name = url.rsplit("/", 1)[1]
        local = find_local(name, search)
        if local is None:
            if name in OPTIONAL:  # not needed for the graphs: load nothing rather than wait on the CDN
                done[url] = "(dropped: optional)"
                return f'{m.group("attr")}="data:text/javascript,"'
            missing.append(url)
            return m.group(0)
        shutil.copyfile(local, out / name)
        if name.endswith(".css") and "bootstrap" in name:
            fonts = local.parent.parent / "fonts"
            if fonts.is_dir():
                shutil.copytree(fonts, html_dir / "fonts", dirs_exist_ok=True)
        done[url] = str(local)
        return f'{m.group("attr")}="vendor/{name}"'

    index.write_text(_TAG.sub(tag, text))
    return done, missing


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/asv_offline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("html_dir", nargs="?", default=".asv/html")
    p.add_argument("--search", action="append", help="more directories holding the JS/CSS files")
    a = p.parse_args(argv)
    try:
        done, missing = vendor(a.html_dir, [*(a.search or []), *SEARCH])
    except FileNotFoundError as e:
        print(f"asv_offline: error: {e}", file=sys.stderr)
        return 2
    for url, path in done.items():
        print(f"vendored {url.rsplit('/', 1)[1]} <- {path}")
    for url in missing:
        print(f"no local copy of {url} (still loaded from the CDN)", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
