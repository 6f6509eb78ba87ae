"""Screenshot a page of a running engine with headless Chromium (how docs/operator-page.png is made).

latentstage run --preset demo &
python scripts/screenshot.py http://127.0.0.1:8080/ docs/operator-page.png --wait 8
"""

from __future__ import annotations

import argparse
import shutil
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url")
    parser.add_argument("path")
    parser.add_argument("--wait", type=float, default=8.0, help="seconds for the page to fill in")
    parser.add_argument("--size", default="1280,900", help="window width,height")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium") or shutil.which("google-chrome") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={args.size}")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(args.url)
        time.sleep(args.wait)
        driver.save_screenshot(args.path)
    finally:
        driver.quit()
    print(f"wrote {args.path}")


if __name__ == "__main__":
    main()
