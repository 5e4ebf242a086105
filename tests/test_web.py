"""The web monitor on a small real project (a 2D job and a ranker Select job run through the
pipeliner, CTF/picks/map files): every page, live fragments with ETags, saving a corrected
selection as a new Select job, scheme actions, and the security rules (token, CSRF, paths)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

starlette = pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from tamis.errors import TamisError  # noqa: E402
from tamis.io.mrc import write_mrc  # noqa: E402
from tamis.io.star import read_star, write_star  # noqa: E402
from tamis.pipeline.project import Project  # noqa: E402
from tamis.simulate.particles import ParticleSimulation, simulate_particles  # noqa: E402
from tamis.web.app import create_app  # noqa: E402


def _write_side_files(root: Path) -> None:
    """CTF, picks and a post-processed map, in RELION's layout."""
    mics = root / "Micrographs"
    mics.mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2):
        write_mrc(mics / f"m{i}.mrc", rng.normal(size=(256, 256)).astype(np.float32), 2.0)
    ctf = pd.DataFrame({
        "rlnMicrographName": ["Micrographs/m1.mrc", "Micrographs/m2.mrc"],
        "rlnOpticsGroup": [1, 1], "rlnDefocusU": [15000.0, 21000.0],
        "rlnDefocusV": [14000.0, 20500.0], "rlnCtfMaxResolution": [4.5, 7.5],
        "rlnCtfImage": ["CtfFind/job002/Micrographs/m1.ctf:mrc",
                        "CtfFind/job002/Micrographs/m2.ctf:mrc"],
    })  # fmt: skip
    (root / "CtfFind" / "job002" / "Micrographs").mkdir(parents=True)
    write_mrc(root / "CtfFind/job002/Micrographs/m1.ctf",
              rng.random((128, 128)).astype(np.float32), 1.0)  # fmt: skip
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnMicrographPixelSize": [2.0]})  # fmt: skip
    write_star({"optics": optics, "micrographs": ctf}, root / "CtfFind/job002/micrographs_ctf.star")
    pick = root / "AutoPick" / "job004"
    (pick / "Micrographs").mkdir(parents=True)
    write_star({"coordinate_files": pd.DataFrame({
        "rlnMicrographName": ["Micrographs/m1.mrc"],
        "rlnMicrographCoordinates": ["AutoPick/job004/Micrographs/m1_autopick.star"]})},
        pick / "autopick.star")  # fmt: skip
    write_star({"": pd.DataFrame({"rlnCoordinateX": [50.0, 120.0, 200.0],
                                  "rlnCoordinateY": [60.0, 128.0, 30.0]})},
               pick / "Micrographs" / "m1_autopick.star")  # fmt: skip
    post = root / "PostProcess" / "job013"
    post.mkdir(parents=True)
    write_mrc(post / "postprocess.mrc", rng.normal(size=(24, 24, 24)).astype(np.float32), 3.0)
    shells = np.arange(13)
    write_star({
        "general": {"rlnFinalResolution": 9.0, "rlnBfactorUsedForSharpening": -150.0},
        "fsc": pd.DataFrame({
            "rlnSpectralIndex": shells, "rlnResolution": shells / 72.0,
            "rlnFourierShellCorrelationCorrected": np.exp(-shells / 5.0),
            "rlnFourierShellCorrelationUnmaskedMaps": np.exp(-shells / 4.0),
        }),
    }, post / "postprocess.star")  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("webproj").resolve()
    cwd = Path.cwd()
    os.chdir(root)
    try:
        simulate_particles(
            ParticleSimulation(structures=["builtin:8zpm"], n_particles=90, box_size=32,
                               pixel_size=4.5, snr=0.5, particles_per_micrograph=45, seed=3),
            "Sim",
        )  # fmt: skip
        p = Project(root)
        c2d = p.schedule("relion.class2d", {
            "fn_img": "Sim/particles.star", "nr_classes": "3", "do_em": "Yes", "do_grad": "No",
            "nr_iter_em": "2", "particle_diameter": "130", "psi_sampling": "20",
            "offset_range": "3", "offset_step": "1.5", "nr_threads": "1",
        }).name  # fmt: skip
        assert p.run(c2d) == "Succeeded"
        opt = sorted((root / c2d).glob("run_it*_optimiser.star"))[-1].relative_to(root)
        sel = p.schedule("relion.select.class2dauto", {"fn_model": str(opt)}).name
        assert p.run(sel) == "Succeeded"
    finally:
        os.chdir(cwd)
    from tamis.schemes import it

    it.install_schemes(root)
    _write_side_files(root)
    return root, c2d, str(opt)


def test_every_page_renders(project):
    root, c2d, _ = project
    c = TestClient(create_app(root))
    page = c.get("/")
    assert page.status_code == 200 and c2d in page.text and "Succeeded" in page.text
    assert "proc" in page.text and "prep" in page.text  # the schemes
    job = c.get("/job", params={"name": c2d})
    assert job.status_code == 200 and "run.out" in job.text and "iteration" in job.text
    mics = c.get("/micrographs")
    assert mics.status_code == 200 and "<svg" in mics.text and "m2.mrc" in mics.text
    assert "2 micrographs" in mics.text
    one = c.get("/micrograph", params={"name": "Micrographs/m1.mrc"})
    assert one.status_code == 200
    assert "power spectrum" in one.text and "15000 / 14000 A" in one.text
    ctf = c.get("/img/ctf", params={"name": "Micrographs/m1.mrc"})
    assert ctf.status_code == 200 and ctf.content[:4] == b"\x89PNG"
    assert c.get("/img/ctf", params={"name": "Micrographs/m2.mrc"}).status_code == 404
    img = c.get("/img/micrograph", params={"name": "Micrographs/m1.mrc"})
    assert img.status_code == 200 and img.content[:4] == b"\x89PNG"
    two = c.get("/class2d")
    assert two.status_code == 200 and 'class="cls' in two.text
    assert "framed" in two.text  # the ranker's Select job was found
    assert "Class distribution (the 3 largest classes)" in two.text
    n_tiles = len(re.findall(r'id="class-\d+"', two.text))
    assert n_tiles == 3
    # the tiles show the score the selection used and each class's share passing the screen
    from tamis.web import view

    sel_dir = next((root / "Select").glob("job*/class_scores.csv"))
    scores = pd.read_csv(sel_dir)
    table = view.class2d_classes(root, c2d).classes
    scored = scores["rlnClassScore"] > -998
    np.testing.assert_allclose(table["score"][scored], scores["tamisSelectionScore"][scored])
    np.testing.assert_allclose(table["network"][scored], scores["rlnClassScore"][scored])
    np.testing.assert_allclose(table["passed"], scores["tamisScreenPassed"])
    assert scores["tamisScreenPassed"].notna().any() and "% pass" in two.text
    cls = c.get("/img/class", params={"job": c2d, "n": 1})
    assert cls.status_code == 200 and cls.content[:4] == b"\x89PNG"
    assert c.get("/img/class", params={"job": c2d, "n": 9}).status_code == 404
    m = c.get("/map")
    assert m.status_code == 200 and "9.00 A" in m.text and "<svg" in m.text
    assert c.get("/img/slices").content[:4] == b"\x89PNG"


def test_live_fragments_use_etags_and_follow_new_files(project, tmp_path):
    root, _, _ = project
    c = TestClient(create_app(root))
    first = c.get("/live/micrographs")
    tag = first.headers["etag"]
    assert c.get("/live/micrographs", headers={"If-None-Match": tag}).status_code == 304
    from tests.helpers import add_micrograph_row

    star = root / "CtfFind/job002/micrographs_ctf.star"
    before = add_micrograph_row(root, "Micrographs/m3.mrc")
    try:
        again = c.get("/live/micrographs", headers={"If-None-Match": tag})
        assert again.status_code == 200 and "m3.mrc" in again.text and "3 micrographs" in again.text
    finally:
        star.write_bytes(before)


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_saving_a_selection_makes_a_select_job(project):
    root, c2d, opt = project
    c = TestClient(create_app(root))
    csrf = _csrf(c.get("/class2d").text)
    r = c.post("/class2d/select", data={"csrf": csrf, "optimiser": opt, "job": c2d,
                                        "classes": "1 3"}, follow_redirects=False)  # fmt: skip
    assert r.status_code == 303
    statuses = Project(root).check()
    new = [n for n, s in statuses.items() if n.startswith("Select/")][-1]
    assert statuses[new] == "Succeeded"
    d = root / new
    flags = next(iter(read_star(d / "backup_selection.star").values()))["rlnSelected"].tolist()
    assert flags == [1, 0, 1]
    data = read_star(sorted((root / c2d).glob("run_it*_data.star"))[-1])["particles"]
    want = data["rlnClassNumber"].astype(int).isin([1, 3])
    kept = read_star(d / "particles.star")["particles"]
    assert len(kept) == int(want.sum())
    assert set(kept["rlnImageName"]) == set(data.loc[want, "rlnImageName"])
    assert len(next(iter(read_star(d / "class_averages.star").values()))) == 2
    assert "saved classes 1 3" in (root / "tamis_web.log").read_text()
    page = c.get(r.headers["location"])
    assert new in page.text  # the message names the new job
    # nothing chosen: a message, no job
    n_jobs = len(Project(root).read().processes)
    c.post("/class2d/select", data={"csrf": csrf, "optimiser": opt, "job": c2d, "classes": ""})
    assert len(Project(root).read().processes) == n_jobs


def test_scheme_actions(project):
    root, _, _ = project
    c = TestClient(create_app(root))
    csrf = _csrf(c.get("/").text)
    r = c.post("/scheme", data={"csrf": csrf, "name": "proc", "action": "reset"})
    assert r.status_code == 200 and "scheme proc reset" in r.text
    r = c.post("/scheme", data={"csrf": csrf, "name": "proc", "action": "abort"})
    assert "not done: scheme proc is not running" in r.text
    r = c.post("/scheme", data={"csrf": csrf, "name": "nope", "action": "reset"})
    assert "no scheme" in r.text
    log = (root / "tamis_web.log").read_text()
    assert "scheme proc reset" in log and "not running" in log


def test_security(project, tmp_path):
    root, c2d, opt = project
    c = TestClient(create_app(root))
    # only files inside the project
    for bad in ("../../../../etc/passwd", "/etc/passwd", "Class2D/../../x", ""):
        assert c.get("/file", params={"path": bad}).status_code == 404
        assert c.get("/micrograph", params={"name": bad}).status_code == 404
    (tmp_path / "secret.txt").write_text("s3cret")
    link = root / "link.txt"
    link.symlink_to(tmp_path / "secret.txt")
    try:
        r = c.get("/file", params={"path": "link.txt"})
        assert r.status_code == 404 and "s3cret" not in r.text
    finally:
        link.unlink()
    assert c.get("/job", params={"name": "../"}).status_code == 404
    assert c.get("/file", params={"path": f"{c2d}run.out"}).status_code == 200
    # actions need the page's CSRF value and the server's own origin
    n_jobs = len(Project(root).read().processes)
    form = {"optimiser": opt, "job": c2d, "classes": "1"}
    assert c.post("/class2d/select", data=form).status_code == 403
    assert c.post("/class2d/select", data={**form, "csrf": "guess"}).status_code == 403
    csrf = _csrf(c.get("/class2d").text)
    evil = c.post("/class2d/select", data={**form, "csrf": csrf},
                  headers={"Origin": "http://evil.example"})  # fmt: skip
    assert evil.status_code == 403
    assert c.get("/class2d/select").status_code == 405
    assert len(Project(root).read().processes) == n_jobs
    # a scheme name with a quote stays inside the confirm() string
    import shutil

    odd = root / "Schemes" / "q'x"
    shutil.copytree(root / "Schemes" / "proc", odd)
    try:
        page = c.get("/").text
        assert "return confirm(&quot;start scheme q&#x27;x?&quot;)" in page
    finally:
        shutil.rmtree(odd)
    # a token: required, checked, then kept in a cookie
    t = TestClient(create_app(root, token="correct-horse"))
    assert t.get("/").status_code == 401
    assert t.get("/", params={"token": "wrong-horse"}).status_code == 403
    assert t.get("/", headers={"X-Tamis-Token": "correct-horse"}).status_code == 200
    assert t.get("/", params={"token": "correct-horse"}).status_code == 200
    assert t.get("/micrographs").status_code == 200  # the cookie


def test_not_a_project(tmp_path):
    with pytest.raises(TamisError, match="not a RELION/tamis project"):
        create_app(tmp_path)
    with pytest.raises(TamisError, match="no such directory"):
        create_app(tmp_path / "missing")


# ---- in a real browser (headless Chromium) -------------------------------------------------------


def test_in_a_browser(project, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.helpers import chrome, new_micrograph_appears, screenshot_pages, serve

    root, c2d, _ = project
    with chrome() as browser, serve(root) as server:
        wait = WebDriverWait(browser, 20)
        pages = ("/", f"/job?name={c2d}", "/micrographs", "/class2d", "/map")
        screenshot_pages(browser, server, pages, tmp_path)
        new_micrograph_appears(browser, server, root, "Micrographs/m9.mrc")
        # choose class 2 alone, save, check the new Select job
        browser.get(server + f"/class2d?job={c2d}")
        n_before = len(Project(root).read().processes)
        for el in browser.find_elements(By.CSS_SELECTOR, ".cls"):
            if "sel" in el.get_attribute("class"):
                el.click()
        browser.find_element(By.ID, "class-2").click()
        assert browser.find_element(By.ID, "classes").get_attribute("value") == "2"
        browser.save_screenshot(str(tmp_path / "class2d_changed.png"))
        browser.find_element(By.ID, "save").click()
        wait.until(lambda d: d.find_elements(By.ID, "msg"))
        assert "saved classes 2" in browser.find_element(By.ID, "msg").text
    procs = Project(root).read().processes
    assert len(procs) == n_before + 1 and procs[-1].type_label == "relion.select.interactive"
    flags = next(iter(read_star(root / procs[-1].name / "backup_selection.star").values()))
    assert flags["rlnSelected"].tolist() == [0, 1, 0]
    assert (tmp_path / "class2d.png").stat().st_size > 1000


def test_cli_errors(tmp_path):
    from typer.testing import CliRunner

    from tamis.cli.main import app

    r = CliRunner().invoke(app, ["web", "--project", str(tmp_path)])
    assert r.exit_code != 0 and "not a RELION/tamis project" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(app, ["web", "--project", str(tmp_path), "--token", "short"])
    assert r.exit_code != 0 and "at least 8 characters" in r.output
