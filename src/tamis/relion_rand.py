"""RELION's random draws where they set a result that its run files record: the sampling
perturbation (``HealpixSampling::resetRandomlyPerturbedSampling``).

RELION reseeds the C library's ``rand()`` with ``srand(random_seed + iter)`` before each
iteration's perturbation (``MlOptimiser::expectationSetup``) and draws ``rnd_unif(f/2, f)`` in
float32; the first instance comes from the generator before any ``srand`` (glibc's default state,
that of ``srand(1)``), when the sampling is set up. Drawing the same numbers here makes a tamis run
with RELION's ``--random_seed`` perturb its sampling exactly as RELION's uninterrupted run does, so
a RELION run continued by tamis (and a side-by-side comparison) differs only where the algorithms
do. (RELION's own ``--continue`` sets its sampling up again and starts the perturbation over from
the first instance, ignoring the one in the file; tamis's ``--continue`` carries it on, so a
continued tamis run equals an uninterrupted one. RELION seeds from the clock when
``random_seed + iter`` is negative; callers pass a seed >= 0 here.)

``rand()`` is glibc's (RELION's builds are Linux builds): the additive feedback generator of
degree 31 and separation 3, seeded by a Park-Miller sequence and run 310 steps before its first
output. Other C libraries' ``rand()`` give other numbers; this module does not follow them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RAND_MAX", "glibc_rand", "perturbation_step", "initial_perturbation", "wrap"]

RAND_MAX = 2147483647
_DEGREE, _SEPARATION, _WARMUP = 31, 3, 310
_MASK32 = 0xFFFFFFFF


def glibc_rand(seed: int, n: int = 1) -> list[int]:
    """The first ``n`` values of glibc's ``rand()`` after ``srand(seed)`` (seed taken as C's
    ``unsigned int``)."""
    word = int(seed) & _MASK32 or 1
    # the seed state is kept as int32: the Park-Miller steps run on the signed value
    if word >= 2**31:
        word -= 2**32
    state = [word & _MASK32]
    for _ in range(1, _DEGREE):
        hi = int(word / 127773)  # C division truncates toward zero
        lo = word - hi * 127773
        word = 16807 * lo - 2836 * hi
        if word < 0:
            word += RAND_MAX
        state.append(word & _MASK32)
    # r[i] = r[i - 31] + r[i - 3] (mod 2^32), r[31..33] = r[0..2]; outputs r[i] >> 1 from i = 344
    r = state + state[:_SEPARATION]
    out: list[int] = []
    i = len(r)
    while len(out) < n:
        r.append((r[i - _DEGREE] + r[i - _SEPARATION]) & _MASK32)
        if i >= _DEGREE + _SEPARATION + _WARMUP:
            out.append(r[i] >> 1)
        i += 1
    return out


def _rnd_unif(a: float, b: float, draw: int) -> float:
    """RELION's ``rnd_unif(a, b)`` for one ``rand()`` value, in its float32 arithmetic."""
    f = np.float32
    if f(a) == f(b):
        return float(f(a))
    return float(f(a) + f(draw) / (f(RAND_MAX) / (f(b) - f(a))))


def wrap(x: float, factor: float) -> float:
    """RELION's ``realWRAP(x, -factor, factor)``."""
    lo, hi = -factor, factor
    span = hi - lo
    if lo <= x <= hi:
        return x
    if x < lo:
        return x - int((x - lo) / span - 1) * span
    return x - int((x - hi) / span + 1) * span


def perturbation_step(seed: int, iteration: int, factor: float) -> float:
    """The increment of the perturbation instance at ``iteration``: ``rnd_unif(f/2, f)`` right
    after ``srand(seed + iteration)`` (0 when ``factor`` is 0: RELION's ``rnd_unif(0, 0)``)."""
    return _rnd_unif(0.5 * factor, factor, glibc_rand(seed + iteration)[0])


def initial_perturbation(factor: float) -> float:
    """The instance set up before iteration 1 (written to RELION's ``_it000_sampling.star``):
    one draw from the unseeded generator, added to zero and wrapped."""
    return wrap(_rnd_unif(0.5 * factor, factor, glibc_rand(1)[0]), factor)
