"""TV bounds against the exact worst case (brute force over sets, in mpmath)."""

import itertools
import math

import mpmath
import numpy as np
import torch

from certkv.rounding import U64
from certkv.tv import BINS, HEAVY, _edges_max, tanh_bound, tv_bound


def exact_worst_tv(pi: np.ndarray, radius: np.ndarray) -> mpmath.mpf:
    """sup TV(p, pi) over p ~ pi e^delta, |delta_i| <= r_i: max over sets A of a/(a+b) - pi(A)."""
    with mpmath.workprec(120):
        p = [mpmath.mpf(float(x)) for x in pi]
        total = mpmath.fsum(p)
        p = [x / total for x in p]
        up = [x * mpmath.exp(mpmath.mpf(float(r))) for x, r in zip(p, radius)]
        dn = [x * mpmath.exp(-mpmath.mpf(float(r))) for x, r in zip(p, radius)]
        best = mpmath.mpf(0)
        for mask in itertools.product((0, 1), repeat=len(p)):
            a = mpmath.fsum(u for u, m in zip(up, mask) if m)
            b = mpmath.fsum(d for d, m in zip(dn, mask) if not m)
            best = max(best, a / (a + b) - mpmath.fsum(x for x, m in zip(p, mask) if m))
        return best


def _random_problems(count: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(rng.integers(1, 9))
        pi = rng.random(n) ** rng.choice([1, 4, 12])
        radius = rng.random(n) * rng.choice([1e-4, 1e-2, 0.3, 2.0, 9.0])
        if rng.random() < 0.25:
            radius[:] = radius[0]
        yield pi, radius


def test_bounds_dominate_the_exact_worst_case_and_data_dependent_is_tighter():
    ratios, tanh_ratios = [], []
    for pi, radius in _random_problems(250, seed=11):
        ours = tv_bound(torch.tensor(pi)[None], torch.tensor(radius)[None])[0].item()
        base = tanh_bound(torch.tensor([radius.max()]))[0].item()
        worst = exact_worst_tv(pi, radius)
        assert mpmath.mpf(ours) >= worst, (pi, radius, ours, worst)
        assert mpmath.mpf(base) >= worst
        assert ours <= base + 1e-12  # base here omits the float64 slack radius (~1e-14)
        if worst > 1e-6:
            ratios.append(ours / float(worst))
            tanh_ratios.append(base / float(worst))
    # measured, not assumed: the data-dependent bound is near the true worst case, tanh is not
    assert np.median(ratios) < 1.05 and np.percentile(ratios, 90) < 1.3
    assert np.percentile(tanh_ratios, 90) > 3


def test_zero_radius_gives_zero_and_single_token():
    assert tv_bound(torch.ones(1, 5, dtype=torch.float64), torch.zeros(1, 5, dtype=torch.float64)).item() < 1e-12
    assert tv_bound(torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 3.0, dtype=torch.float64)).item() < 1e-9


def test_tiny_masses_and_huge_radii_stay_sound():
    pi = np.array([1.0, 1e-300, 1e-30, 1e-8])
    for r in (1e-3, 5.0, 50.0, 700.0):
        radius = np.full(4, r)
        ours = tv_bound(torch.tensor(pi)[None], torch.tensor(radius)[None])[0].item()
        assert mpmath.mpf(ours) >= exact_worst_tv(pi, radius)


def test_divisible_bound_covers_every_split_of_a_group():
    """Groups of tokens given as one mass and the largest radius among them (the decode kernel's
    blocks): the divisible bound dominates the exact worst case over the tokens themselves, however a
    group's mass is spread over them and whatever their radii below the group's."""
    rng = np.random.default_rng(11)
    for _ in range(60):
        groups = int(rng.integers(1, 4))
        sizes = rng.integers(1, 4, size=groups)
        masses, radii, g_mass, g_rad = [], [], [], []
        for size in sizes:
            m = rng.random(size) ** rng.choice([1, 6])
            r_max = rng.random() * rng.choice([1e-3, 0.1, 1.0, 4.0])
            masses += list(m)
            radii += list(r_max * rng.random(size) ** 0.3)
            g_mass.append(m.sum())
            g_rad.append(r_max)
        exact = exact_worst_tv(np.array(masses), np.array(radii))
        bound = tv_bound(torch.tensor([g_mass]), torch.tensor([g_rad]), divisible=True)
        assert float(bound[0]) >= float(exact), (masses, radii)


def test_heavy_entries_are_what_divisibility_gives_up():
    # one heavy group whose worst case splits it: 0/1 membership of the group would understate TV
    tokens = exact_worst_tv(np.array([0.5, 0.5]), np.array([1.0, 1.0]))
    group = tv_bound(torch.tensor([[1.0]]), torch.tensor([[1.0]]), divisible=True)
    atomic = tv_bound(torch.tensor([[1.0]]), torch.tensor([[1.0]]))
    assert float(atomic[0]) < float(tokens) <= float(group[0])


def _best_fraction(mass: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """A search for the best x in [0,1]^K (float64): the best point of a 33-point grid per bin, then
    rounds of exhaustive line searches along each coordinate (4097 points, refined once around the best)."""
    a, b = mass * np.exp(radius), mass * np.exp(-radius)

    def f(xs: np.ndarray) -> np.ndarray:
        return (xs @ a) / (xs @ a + (1 - xs) @ b) - xs @ mass

    axes = np.stack(np.meshgrid(*[np.linspace(0, 1, 33)] * len(mass), indexing="ij"), -1).reshape(-1, len(mass))
    x = axes[f(axes).argmax()]
    for _ in range(6):
        for c in range(len(mass)):
            for line in (np.linspace(0, 1, 4097), None):
                line = np.clip(x[c] + np.linspace(-1, 1, 4097) / 4096, 0, 1) if line is None else line
                xs = np.repeat(x[None], len(line), 0)
                xs[:, c] = line
                x = xs[f(xs).argmax()]
    return x


def test_divisible_maximum_over_the_greedy_edges_is_the_supremum():
    """The edge maximum (certkv.tv._edges_max) of a divisible problem, without binning: with tv_bound's
    float64 slack never below A/(A+B) - M at the best fractional point a fine search finds (in mpmath),
    and within 1e-6 of it (the search's resolution): nothing is lost to a relaxation."""
    rng = np.random.default_rng(7)
    none = torch.zeros(1, 0, dtype=torch.float64)
    for _ in range(150):
        k = int(rng.integers(1, 4))
        mass = rng.random(k) ** rng.choice([1, 6])
        mass /= mass.sum()
        radius = np.sort(rng.random(k) * rng.choice([1e-3, 0.1, 1.0, 4.0]))
        problem = {"mass": torch.tensor(mass)[None], "rad": torch.tensor(radius)[None]}
        ours = float(_edges_max(problem | {"h_mass": none, "h_rad": none, "h_in": none})[0])
        x = _best_fraction(mass, radius)
        with mpmath.workprec(120):
            m = [mpmath.mpf(float(v)) for v in mass]
            e = [mpmath.exp(mpmath.mpf(float(r))) for r in radius]
            a = mpmath.fsum(mi * ei * mpmath.mpf(float(xi)) for mi, ei, xi in zip(m, e, x))
            b = mpmath.fsum(mi / ei * (1 - mpmath.mpf(float(xi))) for mi, ei, xi in zip(m, e, x))
            found = a / (a + b) - mpmath.fsum(mi * mpmath.mpf(float(xi)) for mi, xi in zip(m, x))
        slack = 64 * (BINS + HEAVY) * U64 * math.exp(2 * radius.max()) + 2.0**-45
        assert mpmath.mpf(ours) + mpmath.mpf(slack) >= found, (mass, radius, ours, found)
        assert ours - float(found) < 1e-6, (mass, radius, ours, found)
