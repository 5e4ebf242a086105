"""Screenshots of ``tamis web`` on a project (README's pictures): serves the project on
127.0.0.1 and saves each page with headless Chromium (Debian's chromium + chromium-driver).

    .venv/bin/python scripts/web_screenshots.py --project demo --out docs/images
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tamis.web.app import create_app

PAGES = {"web_pipeline.png": "/", "web_micrographs.png": "/micrographs",
         "web_class2d.png": "/class2d", "web_map.png": "/map"}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", default="demo")
    ap.add_argument("--out", default="docs/images")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(a.project), host="127.0.0.1", port=port,
                                        log_level="warning"))  # fmt: skip
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={a.width},{a.height}"):  # fmt: skip
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        for name, page in PAGES.items():
            drv.get(f"http://127.0.0.1:{port}{page}")
            time.sleep(1.0)  # lazy images
            drv.save_screenshot(str(out / name))
            print(out / name)
    finally:
        drv.quit()
        srv.should_exit = True


if __name__ == "__main__":
    main()
