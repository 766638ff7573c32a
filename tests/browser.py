"""Headless Chromium for the report test: render a local HTML file and read back what it measured.

The report's inline script writes ``{"plots": N, "plots_visible": M, "tables": T, ...}`` to
``document.body.dataset.rendered`` on load; ``render`` dumps the DOM after a virtual-time budget and
parses that attribute back. Chromium is the Debian package ``chromium`` (``make system``).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

MISSING = "headless Chromium not found: run `make system` (Debian package chromium)"
TIMEOUT_S = 90

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def chromium() -> str | None:
    """Path of the Chromium binary, or None."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """The Chromium path; otherwise skip the test, or fail it when STEERSTORE_REQUIRE_BROWSER=1 (CI)."""
    import pytest

    path = chromium()
    if path is None:
        if os.environ.get("STEERSTORE_REQUIRE_BROWSER") == "1":
            pytest.fail(MISSING, pytrace=False)
        pytest.skip(MISSING)
    return path


def _run(extra: list[str], html_path, timeout: float) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        raise RuntimeError(MISSING)
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="steerstore-chromium-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *extra, url]
        env = dict(os.environ, HOME=profile)  # keeps Chromium's crash/cache dirs out of the real home
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"Chromium timed out after {timeout:.0f} s on {url}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"Chromium exited with {proc.returncode} on {url}:\n{proc.stderr[-3000:]}")
    return proc


def render(html_path, timeout: float = TIMEOUT_S) -> dict:
    """Load the file headless and return ``{"rendered": <data-rendered JSON>, "dom": <dumped DOM>}``."""
    proc = _run(["--virtual-time-budget=5000", "--dump-dom"], html_path, timeout)
    dom = proc.stdout
    body = re.search(r"<body\b[^>]*>", dom)
    if body is None:
        raise RuntimeError(f"Chromium dumped no <body> for {html_path}:\n{proc.stderr[-3000:]}")
    found = re.search(r'\sdata-rendered="([^"]*)"', body.group(0))
    if found is None:
        raise RuntimeError(f"the page did not set body[data-rendered] (script did not run?):\n{proc.stderr[-3000:]}")
    return {"rendered": json.loads(html.unescape(found.group(1))), "dom": dom}


def screenshot(html_path, png_path, width: int = 1200, height: int = 3000, timeout: float = TIMEOUT_S) -> Path:
    """Save a PNG screenshot of the page (the top ``height`` pixels)."""
    png = Path(png_path).resolve()
    _run([f"--screenshot={png}", f"--window-size={width},{height}", "--virtual-time-budget=5000"], html_path, timeout)
    if not png.exists():
        raise RuntimeError(f"Chromium wrote no screenshot to {png}")
    return png
