"""A PNG of a report page (`python -m dreamr_jax.report`) as a real browser draws it.

    python bench/report_screenshot.py runs/report/report.html docs/report.png [--height 2000]

Renders with headless Chromium (Debian: `apt-get install chromium`), then keeps the rows down
to the last one with content and shrinks the picture until its PNG fits `--max-kb`, so that it
can live in docs/.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageChops


def screenshot(page: Path, width: int, height: int) -> Image.Image:
    """The page drawn by headless Chromium in a width x height window."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as folder:
        png = Path(folder) / "page.png"
        # --no-sandbox: Chromium's sandbox needs user namespaces, which containers run as root
        # do not give; the page is our own file.
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            page.resolve().as_uri(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if not png.exists():
            raise SystemExit(f"chromium drew nothing (exit {done.returncode}):\n{done.stderr}")
        return Image.open(png).convert("RGB")


def trimmed(image: Image.Image) -> Image.Image:
    """`image` without the blank rows below its content."""
    blank = Image.new("RGB", image.size, image.getpixel((image.width - 1, image.height - 1)))
    box = ImageChops.difference(image, blank).getbbox()
    return image if box is None else image.crop((0, 0, image.width, min(image.height, box[3] + 16)))


def fitted_png(image: Image.Image, max_kb: int) -> bytes:
    """The PNG of `image`, shrunk by 10% steps until it is at most `max_kb` kilobytes."""
    while True:
        # A 256-colour palette keeps text sharp at a fraction of a full-colour PNG's size.
        buffer = io.BytesIO()
        image.quantize(256).save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= max_kb * 1024 or image.width < 400:
            return buffer.getvalue()
        image = image.resize((int(image.width * 0.9), int(image.height * 0.9)), Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("page", type=Path, help="the report's HTML file")
    parser.add_argument("png", type=Path, help="where the PNG goes")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--max-kb", type=int, default=400)
    args = parser.parse_args(argv)
    if not args.page.is_file():
        print(f"{args.page}: no such file", file=sys.stderr)
        return 2
    data = fitted_png(trimmed(screenshot(args.page, args.width, args.height)), args.max_kb)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    args.png.write_bytes(data)
    with Image.open(args.png) as image:
        print(f"{args.png}: {image.width}x{image.height}, {len(data) / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
