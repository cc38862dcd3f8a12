"""Screenshot of the ``fewshot serve`` page with results, for the README (docs/serve-screenshot.png).

Starts the service on ``--index`` (loopback, free port), opens the page in headless Debian
Chromium through Playwright, uploads ``--photo``, waits for the results and thumbnails, and
saves a palette PNG (kept small for the repository).

    python bench/serve_screenshot.py --index grocery-index \\
        --photo ../shared/data/grocery-store-dataset/dataset/test/Packages/Oat-Milk/Oatly-Oat-Milk/Oatly-Oat-Milk_005.jpg \\
        --out docs/serve-screenshot.png
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_serve import free_port, start_server, wait_ready  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--photo", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("docs/serve-screenshot.png"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--colors", type=int, default=192, help="palette size of the saved PNG")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.index, port)
    try:
        wait_ready(url, proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": args.width, "height": 800})
            page.goto(url + "/")
            page.wait_for_function("document.querySelector('#status').textContent.includes('articles')")
            page.wait_for_selector("#articles tbody tr")
            page.set_input_files("#photo", str(args.photo))
            page.click("#classify-btn")
            page.wait_for_selector("#predictions .prediction")
            page.wait_for_function("[...document.querySelectorAll('#predictions img, #neighbors img, #query-preview')]"
                                   ".every(img => img.complete && img.naturalWidth > 0)")
            page.wait_for_timeout(300)
            png = page.screenshot(full_page=True)
            top1 = page.text_content("#top1")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(15)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    small = image.quantize(colors=args.colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    small.save(args.out, optimize=True)
    print(f"top-1 on the page: {top1}; wrote {args.out} ({image.size[0]}x{image.size[1]}, "
          f"{args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
