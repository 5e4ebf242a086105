"""RELION's sampling perturbation drawn as RELION draws it (tamis.relion_rand): glibc's
``rand()`` against the C library itself, and the instances against RELION 5.0.1's run files."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest

from tamis.class2d.sampling import Sampling
from tamis.relion_rand import (
    RAND_MAX,
    glibc_rand,
    initial_perturbation,
    perturbation_step,
    wrap,
)

# rlnSamplingPerturbInstance of RELION 5.0.1 runs made on the development VM: a Refine3D job
# under MPI (--random_seed 1, the 96-px C4 benchmark of BENCHMARKS.md), its it000..it004
# sampling files; a plain Class2D job (--random_seed 11, the hard recipe), it001..it003 (RELION
# writes 5-6 digits)
RELION_REFINE3D_SEED1 = [0.460047, -0.11471, 0.275636, -0.24525, 0.073437]
RELION_CLASS2D_SEED11 = [-0.09355, 0.314608, -0.18552]


def _libc():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc is not this machine's C library (RELION's numbers are glibc's)")
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.srand.argtypes = [ctypes.c_uint]
    return libc


@pytest.mark.parametrize("seed", [0, 1, 2, 11, 1733540000, 2**31 - 1, 2**31, 2**32 - 1])
def test_glibc_rand_matches_the_c_library(seed):
    libc = _libc()
    libc.srand(seed)
    expected = [libc.rand() for _ in range(100)]
    got = glibc_rand(seed, 100)
    assert got == expected
    assert all(0 <= v <= RAND_MAX for v in got)


def _instances(seed: int, iterations: int) -> list[float]:
    s = Sampling()
    s.start_perturbation()
    out = [s.perturbation]
    for it in range(1, iterations + 1):
        s.advance_perturbation(seed, it)
        out.append(s.perturbation)
    return out


def test_perturbation_instances_are_relions():
    assert _instances(1, 4) == pytest.approx(RELION_REFINE3D_SEED1, abs=1e-5)
    assert _instances(11, 3)[1:] == pytest.approx(RELION_CLASS2D_SEED11, abs=1e-5)
    assert initial_perturbation(0.5) == pytest.approx(RELION_REFINE3D_SEED1[0], abs=1e-5)


def test_no_perturbation_factor_keeps_the_sampling_still():
    s = Sampling(perturb_factor=0.0)
    s.start_perturbation()
    s.advance_perturbation(3, 1)
    assert s.perturbation == 0.0


@pytest.mark.parametrize(
    ("x", "expected"), [(0.2, 0.2), (0.5, 0.5), (0.7, -0.3), (1.7, -0.3), (-0.6, 0.4), (-2.6, 0.4)]
)
def test_wrap_follows_relions_macro(x, expected):
    assert wrap(x, 0.5) == pytest.approx(expected)


def test_seed_plus_iteration_wraps_as_c_unsigned():
    """``srand(random_seed + iter)`` takes an ``unsigned int``: past 2^32 the seed wraps."""
    assert perturbation_step(2**32 - 1, 2, 0.5) == perturbation_step(1, 0, 0.5)
    assert perturbation_step(5, 1, 0.5) != perturbation_step(5, 2, 0.5)
