"""The built-in example behind ``make demo`` runs without ../shared and reports what it made."""

from __future__ import annotations

from tamis.demo import run_demo


def test_demo_runs_end_to_end(tmp_path):
    lines = run_demo(tmp_path / "demo", class2d_iterations=1)
    text = "\n".join(lines)
    assert "particles: 2000 images of 64 px" in text
    assert "2D classification (EM, K=8, 1 iterations)" in text
    assert sum(line.strip().startswith("class") for line in lines) >= 2
    assert (tmp_path / "demo" / "Class2D" / "run_it001_optimiser.star").is_file()
    assert (tmp_path / "demo" / "micrographs" / "truth" / "coordinates.star").is_file()
