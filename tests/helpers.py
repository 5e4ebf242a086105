"""Small data makers shared by several test modules."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs


def tiny_particles(
    dest: str | Path, *, n: int = 240, seed: int = 2, junk_fraction: float = 0.1
) -> Path:
    """``n`` simulated 32 px particles of 8ZPM and its receptor chain (4.5 A/px, SNR 0.3, ice
    and empty-box junk, 60 per micrograph) in ``dest``; returns their particles.star."""
    from tamis.simulate.particles import ParticleSimulation, simulate_particles

    simulate_particles(
        ParticleSimulation(
            structures=["builtin:8zpm", "builtin:8zpm@R"], n_particles=n, box_size=32,
            pixel_size=4.5, snr=0.3, junk_fraction=junk_fraction, junk_kinds=("ice", "empty"),
            particles_per_micrograph=60, seed=seed,
        ),
        dest,
    )  # fmt: skip
    return Path(dest) / "particles.star"


def run_job_in(root: Path, job_dir: str) -> str:
    """:func:`tamis.pipeline.jobs.run_job` from the project directory ``root`` (RELION's
    working directory), in this process."""
    import os

    from tamis.pipeline.jobs import run_job

    cwd = os.getcwd()
    os.chdir(root)
    try:
        return run_job(job_dir)
    finally:
        os.chdir(cwd)


def wait_for(path: Path, child, seconds: float = 300) -> None:
    """Until ``path`` exists, while the background job ``child`` runs (its run.err on failure)."""
    import time

    deadline = time.time() + seconds
    run_err = path.parent / "run.err"
    while not path.exists():
        assert child.poll() is None and time.time() < deadline, (
            run_err.read_text() if run_err.exists() else ""
        )
        time.sleep(0.05)


def tiny_micrographs(
    dest: str | Path, *, n: int = 1, size: int = 384, per: int = 10, snr: float = 0.5,
    seed: int = 4,
) -> Path:  # fmt: skip
    """``n`` simulated ``size``² micrographs at 3 A/px in ``dest`` (an Import job directory);
    returns their micrographs.star."""
    return simulate_micrographs(
        MicrographSimulation(
            n_micrographs=n, height_px=size, width_px=size, pixel_size=3.0,
            particles_per_micrograph=per, snr=snr, seed=seed,
        ),
        dest,
    ).star  # fmt: skip


# ---- EER movies: an encoder written from the format description (run length, then sub-pixel
# code), independent of the reader --------------------------------------------------------------


def eer_encode(
    positions: np.ndarray, symbols: np.ndarray, n_pixels: int, run_bits: int = 7, sub_bits: int = 4
) -> bytes:
    """One EER frame (compression 65001): for each electron the run of empty pixels before
    it (7 bits; a run of 127 continues without an electron), then its 4-bit sub-pixel symbol
    XOR 0x0A; bits least significant first; a final run reaching the last pixel ends it; the
    strip is padded to whole 16-bit words."""
    bits: list[int] = []

    def put(value, n):
        bits.extend((value >> b) & 1 for b in range(n))

    top = (1 << run_bits) - 1
    cursor = 0
    for pos, sym in zip(positions, symbols, strict=True):
        gap = pos - cursor
        while gap >= top:
            put(top, run_bits)
            gap -= top
        put(gap, run_bits)
        put(sym ^ 0x0A, sub_bits)
        cursor = pos + 1
    gap = n_pixels - cursor
    while gap >= top:
        put(top, run_bits)
        gap -= top
    put(gap, run_bits)
    put(0, sub_bits)
    while len(bits) % 16:
        bits.append(0)
    arr = np.array(bits, np.uint8).reshape(-1, 8)[:, ::-1]
    return np.packbits(arr).tobytes()


def write_eer(path: str | Path, frames_events: list, side: int) -> None:
    """A BigTIFF with one EER-compressed page per raw frame (written uncompressed as bytes,
    then the page tags set to the EER geometry and compression 65001)."""
    meta = b'<metadata><item name="numberOfFrames">%d</item></metadata>' % len(frames_events)
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, (pos, sym) in enumerate(frames_events):
            data = np.frombuffer(eer_encode(pos, sym, side * side), np.uint8)
            tif.write(data[None], contiguous=False,
                      extratags=[(65001, 7, None, meta, True)] if k == 0 else None)  # fmt: skip
    with tifffile.TiffFile(path, mode="r+") as tif:
        for page in tif.pages:
            page.tags["ImageWidth"].overwrite(side)
            page.tags["ImageLength"].overwrite(side)
            page.tags["RowsPerStrip"].overwrite(side)
            page.tags["Compression"].overwrite(65001)


# ---- the web monitor in a real browser --------------------------------------------------------

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()),
                None)  # fmt: skip
CHROMEDRIVER = "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None


@contextmanager
def chrome(width: int = 1400, height: int = 1000):
    """Headless Chromium driven by selenium; skips the test (saying how to enable it) when
    Chromium, its driver or selenium is missing."""
    import pytest

    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("browser tests need Chromium: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):  # fmt: skip
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


@contextmanager
def serve(project: Path, poll_ms: int = 400):
    """``tamis web`` on ``project`` at a free 127.0.0.1 port (uvicorn in a thread); yields the
    base URL."""
    import socket
    import threading
    import time

    import uvicorn

    from tamis.web.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(project, poll_ms=poll_ms), host="127.0.0.1",
                                        port=port, log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(400):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def add_micrograph_row(project: Path, name: str) -> bytes:
    """Append a copy of the first row, renamed ``name``, to the newest CTF job's table (as a new
    micrograph would arrive); returns the file's old bytes to put back."""
    from tamis.io.star import read_star, write_star

    star = sorted(project.glob("CtfFind/job*/micrographs_ctf.star"))[-1]
    before = star.read_bytes()
    blocks = read_star(star)
    t = blocks["micrographs"]
    blocks["micrographs"] = pd.concat(
        [t, t.iloc[[0]].assign(rlnMicrographName=name)], ignore_index=True
    )
    write_star(blocks, star)
    return before


def screenshot_pages(browser, server: str, pages, out_dir: Path) -> None:
    """Open each page (its title must be tamis's) and save a screenshot of it in ``out_dir``."""
    for page in pages:
        browser.get(server + page)
        assert "tamis" in browser.title, page
        name = page.strip("/").split("?")[0] or "pipeline"
        browser.save_screenshot(str(out_dir / f"{name}.png"))


def new_micrograph_appears(browser, server: str, project: Path, name: str) -> None:
    """Open the micrographs page, add ``name`` to the CTF table, and wait until the page lists it
    without a reload (a value set in the page survives); the table is put back after."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/micrographs")
    browser.execute_script("window.sameDocument = 1")
    star = sorted(project.glob("CtfFind/job*/micrographs_ctf.star"))[-1]
    before = add_micrograph_row(project, name)
    try:
        WebDriverWait(browser, 30).until(lambda d: name in d.find_element(By.ID, "live").text)
        assert browser.execute_script("return window.sameDocument") == 1
    finally:
        star.write_bytes(before)
