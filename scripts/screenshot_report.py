"""Open a release's report.html in a real headless browser (Chromium) and save a screenshot of the
whole page as a small PNG.

    python scripts/screenshot_report.py RELEASE_FOLDER OUT.png [--width 1280] [--scale 0.5]

The browser is `chromium` (or chromium-browser / google-chrome) from PATH, run with --headless and
--screenshot; the page is rendered in a tall window and the blank space below the content is cut.
The PNG is scaled and reduced to a 256-colour palette so that it stays small enough to keep in git
(docs/report.png). Exits 1 when no browser is found.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def screenshot(report_html: str, out_png: str, width: int = 1280, height: int = 6000, scale: float = 0.5) -> str:
    """Renders `report_html` in headless Chromium; writes the cropped, scaled PNG to `out_png`."""
    from PIL import Image, ImageChops

    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(f"no headless browser found (tried {', '.join(BROWSERS)})")
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "page.png")
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
                        f"--screenshot={raw}", "file://" + os.path.abspath(report_html)],
                       check=True, capture_output=True, timeout=120)
        img = Image.open(raw).convert("RGB")
    box = ImageChops.difference(img, Image.new("RGB", img.size, "white")).getbbox()
    if box is None:
        raise RuntimeError(f"{report_html}: the browser rendered a blank page")
    img = img.crop((0, 0, img.width, min(img.height, box[3] + 20)))
    img = img.resize((int(img.width * scale), int(img.height * scale)), Image.LANCZOS)
    img.quantize(colors=256).save(out_png, optimize=True)
    return out_png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release", help="release folder holding report.html")
    ap.add_argument("output", help="PNG to write")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--scale", type=float, default=0.5)
    args = ap.parse_args(argv)
    try:
        path = screenshot(os.path.join(args.release, "report.html"), args.output, args.width, scale=args.scale)
    except (FileNotFoundError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"screenshot_report: {e}", file=sys.stderr)
        return 1
    print(f"{path}: {os.path.getsize(path):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
