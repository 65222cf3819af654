"""Screenshot an HTML dashboard with headless Chromium.

Usage::

    python examples/screenshot_dashboard.py dashboard.html dashboard.png [--latent 12]

Needs a Chromium executable (Debian: ``apt-get install chromium chromium-driver``); no
Python package beyond the standard library. ``--latent`` opens that latent's panel (the
page reads ``#latent-N`` from its address).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser():
    for name in BROWSERS:
        found = shutil.which(name)
        if found is not None:
            return found
    raise SystemExit(
        f"no headless browser found (looked for {', '.join(BROWSERS)}); "
        "install one with: apt-get install chromium chromium-driver"
    )


def screenshot(html_path, png_path, *, width=1280, height=1600, latent=None):
    """Render `html_path` in headless Chromium and save a `width` x `height` PNG."""
    html_path = Path(html_path).resolve()
    png_path = Path(png_path).resolve()
    if not html_path.is_file():
        raise SystemExit(f"expected an HTML file, got {html_path} (not found)")
    url = html_path.as_uri() + ("" if latent is None else f"#latent-{latent}")
    with tempfile.TemporaryDirectory() as profile:
        command = [
            find_browser(),
            "--headless",
            "--no-sandbox",  # needed as root (containers, CI)
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png_path}",
            url,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0 or not png_path.is_file():
        raise SystemExit(f"Chromium failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return png_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", help="dashboard HTML file")
    parser.add_argument("png", help="screenshot to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1600)
    parser.add_argument("--latent", type=int, default=None, help="latent panel to open")
    args = parser.parse_args(argv)
    path = screenshot(args.html, args.png, width=args.width, height=args.height, latent=args.latent)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
