"""The flip rate of preference labels from out-of-fold reward margins: a mirrored Gaussian mixture (numpy only).

Model. A scorer trained on the other folds gives pair i the margin m_i = s(chosen_i) - s(rejected_i). On a pair
whose label is right, m_i follows the clean-margin density f; a flipped pair swaps chosen and rejected, so its
margin is the negative of a clean one and follows f(-m). With a flip rate eps that does not depend on the pair:

    p(m) = (1 - eps) f(m) + eps f(-m),        f(m) = sum_g pi_g N(m; mu_g, sigma_g^2),  mu_g >= 0,  eps in [0, 1/2].

f is a mixture of G Gaussians (G picked by BIC, 1..3) rather than one: on builtin:arith the scorer separates pairs
that differ in manners well (a component far from 0) and barely separates those that differ only in arithmetic (a
component near 0). The scorer's own mistakes on clean pairs are f's tail below 0 and are not counted as flips; a
raw disagreement rate P(m < 0) would count them (on builtin:arith about a fifth of clean pairs). What identifies eps
is the asymmetry: a component with mu_g well above 0 shows its flipped share as a mirror bump at -mu_g. A component
at mu_g = 0 is its own mirror, so flips of pairs the scorer cannot tell apart are invisible to the fit: eps is
learned from the pairs the scorer sees, and assumed the same for the others (the assumption near-tie noise breaks:
see docs/robustness.md, "Auditing preference labels").

Fit: EM on the latent (flip z_i, component g_i); the M-step for mu_g uses the un-flipped values z_i m_i' (m_i for
z = 0, -m_i for z = 1), clipped at 0, so the mirror stays a mirror. Several starts, the best log-likelihood wins.
Interval: profile likelihood, {eps : 2 [l(eps_hat) - l_p(eps)] <= 3.84} (chi-square, 1 degree of freedom, 95%);
at the boundary eps = 0 this is a little conservative, and it contains 0 whenever 0 is not rejected.
Posterior (the per-pair suspicion): P(z_i = 1 | m_i) = eps f(-m_i) / p(m_i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

CHI2_95 = 3.841458820694124  # the 95% quantile of chi-square with 1 degree of freedom
GRID = 0.01  # the profile likelihood's grid over eps in [0, 1/2]
# The smallest component width, in units of the margins' RMS. A sign within a tenth of the margins' scale is no
# evidence of a flip: scorers give many pairs they cannot tell apart margins of ~1e-4 RMS, and with a floor of
# 1e-3 BIC picked spikes at 0 (sigma 0.001 and 0.016) whose slightly positive means made the signs of those tiny
# margins count (builtin:arith, 1000 pairs, 20% flips, seed 1: eps 0.275, interval 0.270 to 0.277, for 0.194
# among separated pairs; 0.196 with this floor).
MIN_SIGMA = 0.1


@dataclass
class FlipFit:
    """The fitted mixture. `posterior` is [N], P(flipped | m_i), in the order of the margins given."""

    eps: float
    interval: tuple[float, float]
    components: int
    weights: list[float]
    means: list[float]
    sigmas: list[float]
    loglik: float
    bic: float
    posterior: np.ndarray = field(repr=False)
    scale: float = 1.0  # the RMS the margins were divided by; means and sigmas are in those units


def flip_posterior(margins, eps: float, weights, means, sigmas) -> np.ndarray:
    """[N] P(flipped | m) = eps f(-m) / [(1 - eps) f(m) + eps f(-m)] for f = sum_g w_g N(mu_g, sigma_g^2)."""
    m = np.asarray(margins, dtype=np.float64)
    clean, flipped = _densities(m, np.asarray(weights), np.asarray(means), np.asarray(sigmas))
    num = eps * flipped.sum(1)
    den = (1 - eps) * clean.sum(1) + num
    return np.divide(num, den, out=np.full_like(num, eps), where=den > 0)


def fit_flip_rate(
    margins,
    components: int | None = None,
    *,
    max_components: int = 3,
    starts: int = 4,
    seed: int = 0,
) -> FlipFit:
    """Fit p(m) = (1 - eps) f(m) + eps f(-m) to [N] margins (see the module docstring). `components`: G, or None to
    pick G in 1..max_components by BIC. Margins are divided by their RMS first (a sign flip leaves the RMS alone,
    so it does not depend on eps), which makes the fit invariant to the scorer's scale.

    eps is found on its profile likelihood l_p(eps) = max over f of l(eps, f), on a grid of step GRID over
    [0, 1/2] (refined by a parabola through the best grid point and its neighbours): EM moves eps very slowly where
    the mirrored components overlap (on 2000 margins from N(1, 1) at eps = 0.1, EM stopped by a relative tolerance
    of 1e-8 reported 0.073; the maximum is at 0.101), while f with eps held fixed converges in tens of steps."""
    m = np.asarray(margins, dtype=np.float64).ravel()
    if m.size < 2 or not np.all(np.isfinite(m)):
        bad = int(np.sum(~np.isfinite(m)))
        raise ValueError(f"fit_flip_rate needs at least 2 finite margins, got {m.size} ({bad} not finite)")
    scale = float(np.sqrt(np.mean(m**2))) or 1.0
    x = m / scale
    rng = np.random.default_rng(seed)
    choices = [components] if components else list(range(1, max_components + 1))
    best = None
    for g in choices:
        fit = _best_of(x, g, starts, rng)
        n_params = 3 * g  # weights (g - 1), means (g), sigmas (g), eps (1)
        bic = -2 * fit[-1] + n_params * math.log(x.size)
        if best is None or bic < best[0]:
            best = (bic, g, fit)
    bic, g, start = best
    grid, lls, shapes = _profile(x, start)
    k = int(np.argmax(lls))
    eps = _parabola_top(grid, lls, k)
    _, w, mu, sd, ll = _em(x, eps, *shapes[k], fix_eps=True)
    lo, hi = _crossings(grid, lls, max(ll, lls[k]))
    return FlipFit(
        eps=float(eps),
        interval=(lo, hi),
        components=g,
        weights=[float(v) for v in w],
        means=[float(v) for v in mu],
        sigmas=[float(v) for v in sd],
        loglik=float(ll),
        bic=float(bic),
        posterior=flip_posterior(x, eps, w, mu, sd),
        scale=scale,
    )


def _densities(x: np.ndarray, w: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, G] w_g N(x; mu_g, sd_g) and w_g N(-x; mu_g, sd_g) (the clean and the mirrored component densities)."""
    norm = w / (sd * math.sqrt(2 * math.pi))
    clean = norm * np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2)
    flipped = norm * np.exp(-0.5 * ((-x[:, None] - mu) / sd) ** 2)
    return clean, flipped


def _loglik(x, eps, w, mu, sd) -> float:
    clean, flipped = _densities(x, w, mu, sd)
    return float(np.sum(np.log((1 - eps) * clean.sum(1) + eps * flipped.sum(1) + 1e-300)))


def _em(x, eps, w, mu, sd, *, fix_eps: bool = False, iters: int = 300, tol: float = 1e-6):
    """EM from the given start; `fix_eps` keeps eps (for the profile likelihood). Returns (eps, w, mu, sd, loglik)."""
    prev = -math.inf
    for _ in range(iters):
        clean, flipped = _densities(x, w, mu, sd)
        r0, r1 = (1 - eps) * clean, eps * flipped  # [N, G] joint of (not flipped, g) and (flipped, g) with x
        total = r0.sum(1) + r1.sum(1) + 1e-300
        ll = float(np.sum(np.log(total)))
        r0, r1 = r0 / total[:, None], r1 / total[:, None]
        if not fix_eps:
            eps = float(min(max(r1.sum() / x.size, 0.0), 0.5))
        rg = r0 + r1  # [N, G]
        ng = rg.sum(0) + 1e-12
        w = ng / ng.sum()
        # The clean value of pair i is x_i if not flipped, -x_i if flipped.
        mu = np.maximum(((r0 - r1) * x[:, None]).sum(0) / ng, 0.0)
        var = (r0 * (x[:, None] - mu) ** 2 + r1 * (-x[:, None] - mu) ** 2).sum(0) / ng
        sd = np.sqrt(np.maximum(var, MIN_SIGMA**2))
        if ll - prev < tol:  # absolute, in log-likelihood units
            break
        prev = ll
    return eps, w, mu, sd, _loglik(x, eps, w, mu, sd)


def _best_of(x, g, starts, rng):
    """The best of `starts` EM runs for G = g: means spread over quantiles of |x|, eps started at 0.05..0.45."""
    best = None
    ax = np.abs(x)
    for s in range(starts):
        qs = np.sort(rng.uniform(0.1, 0.9, g)) if s else (np.arange(g) + 0.5) / g
        mu = np.quantile(ax, qs)
        sd = np.full(g, max(float(np.std(ax)) / g, 0.05))
        w = np.full(g, 1.0 / g)
        eps0 = 0.05 + 0.4 * s / max(starts - 1, 1)
        fit = _em(x, eps0, w, mu, sd)
        if best is None or fit[-1] > best[-1]:
            best = fit
    return best


def _profile(x, start) -> tuple[np.ndarray, np.ndarray, list]:
    """l_p(eps) on the grid 0, GRID, ..., 1/2: f refitted with eps fixed at each point, from the neighbouring grid
    point's f (and, within 0.05 of the free fit's eps, from the free fit's f too: the better kept). Returns (grid [K], l_p [K], f's parameters)."""
    _, w0, mu0, sd0, _ = start
    grid = np.round(np.arange(0, 0.5 + GRID / 2, GRID), 6)
    lls, shapes = np.empty(grid.size), [None] * grid.size
    prev = (w0, mu0, sd0)
    eps0 = start[0]
    for i, e in enumerate(grid):
        fit = _em(x, e, *prev, fix_eps=True, tol=1e-3)
        if abs(e - eps0) <= 0.05:  # near the free fit, its f is a start too (the neighbour's may sit in another mode)
            other = _em(x, e, w0, mu0, sd0, fix_eps=True, tol=1e-3)
            fit = fit if fit[-1] >= other[-1] else other
        lls[i], shapes[i] = fit[-1], fit[1:4]
        prev = shapes[i]
    return grid, lls, shapes


def _parabola_top(grid: np.ndarray, lls: np.ndarray, k: int) -> float:
    """The top of the parabola through grid points k-1, k, k+1 (kept within them); the grid point at the ends."""
    if k == 0 or k == grid.size - 1:
        return float(grid[k])
    y0, y1, y2 = lls[k - 1], lls[k], lls[k + 1]
    curve = y0 - 2 * y1 + y2
    if curve >= 0:
        return float(grid[k])
    shift = 0.5 * (y0 - y2) / curve  # in grid steps, within [-0.5, 0.5] when y1 is the largest of the three
    return float(grid[k] + np.clip(shift, -1, 1) * (grid[1] - grid[0]))


def _crossings(grid: np.ndarray, lls: np.ndarray, ll_top: float) -> tuple[float, float]:
    """Where l_p falls CHI2_95 / 2 below its top, on either side of it (linear between grid points); an end of
    the grid when it never does."""
    inside = np.flatnonzero(ll_top - lls <= CHI2_95 / 2)
    cut = ll_top - CHI2_95 / 2

    def between(i: int, j: int) -> float:  # grid[i] inside, grid[j] outside
        t = (lls[i] - cut) / max(lls[i] - lls[j], 1e-12)
        return float(grid[i] + t * (grid[j] - grid[i]))

    lo_i, hi_i = int(inside[0]), int(inside[-1])
    lo = float(grid[0]) if lo_i == 0 else between(lo_i, lo_i - 1)
    hi = float(grid[-1]) if hi_i == grid.size - 1 else between(hi_i, hi_i + 1)
    return lo, hi
