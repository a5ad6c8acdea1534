"""Speculative-decoding theory: acceptance rate, speedup model, optimal draft length, bias bounds
and the adaptive per-client (gamma, K) controller.

numpy/scipy only (no torch), so the ``theory`` CLI command and the tests stay fast.
Derivations and the worked example are in ``docs/THEORY.md``.

Model (Leviathan et al. 2023; TK-SLT, Zheng & Yang 2025):

* acceptance rate  ``alpha = sum_x min(p(x), q(x)) = 1 - TV(p, q)``;
* expected tokens emitted by one verification step with ``gamma`` drafts (i.i.d. acceptance
  with probability ``alpha``, plus the correction/bonus token)
  ``E[N] = (1 - alpha**(gamma + 1)) / (1 - alpha)``  (``gamma + 1`` at ``alpha = 1``);
* round time ``T(gamma) = a * gamma + b`` (``a``: cost per drafted position -- draft compute +
  uplink bytes / bandwidth; ``b``: fixed cost per round -- verify + RTT + downlink + engine);
* speedup over target-only decoding (``b`` per token): ``b * E[N] / T(gamma)``;
* throughput-optimal real draft length (lower branch of Lambert W), ``beta = -ln(alpha)``,
  ``d = b/a - 1``:  ``gamma* = (-W_{-1}(-exp(-(1 + beta*d))) - 1) / beta - b/a``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import lambertw

from .ahead_cost import best_gamma_drafting_ahead, throughput_drafting_ahead
from .expected_tokens import expected_tokens_per_step
from .wire import bytes_per_position  # the wire format's own count (ids uint16 up to V = 65536)

__all__ = [
    "acceptance_rate",
    "tv_distance",
    "tv_bias_bound",
    "expected_tokens_per_step",
    "round_time",
    "speedup",
    "optimal_gamma",
    "best_integer_gamma",
    "one_step_output_law",
    "alpha_from_counts",
    "LinkProfile",
    "ControllerConfig",
    "Decision",
    "AdaptiveController",
]


# ---------------------------------------------------------------------------------------------
# Distributions
# ---------------------------------------------------------------------------------------------

def _as_scalar_or_array(x: np.ndarray) -> float | np.ndarray:
    return float(x) if np.ndim(x) == 0 else x


def acceptance_rate(p, q) -> float | np.ndarray:
    """alpha = sum_x min(p(x), q(x)) along the last axis (= 1 - TV(p, q) for distributions)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape[-1:] != q.shape[-1:]:
        raise ValueError(f"p and q must share the last (vocabulary) axis, got {p.shape} and {q.shape}")
    return _as_scalar_or_array(np.minimum(p, q).sum(axis=-1))


def tv_distance(p, q) -> float | np.ndarray:
    """Total variation distance 0.5 * sum_x |p(x) - q(x)| along the last axis."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape[-1:] != q.shape[-1:]:
        raise ValueError(f"p and q must share the last (vocabulary) axis, got {p.shape} and {q.shape}")
    return _as_scalar_or_array(0.5 * np.abs(p - q).sum(axis=-1))


def tv_bias_bound(kept_mass) -> float | np.ndarray:
    """Per-position bound on TV(q, q_hat) for a distribution reconstructed from its top-K.

    ``1 - S`` with ``S`` the kept mass (sum of the K sent probabilities), clipped to [0, 1].
    Every reconstruction rule here (uniform diffusion, renormalisation, temperature scaling)
    gives each kept token at least its true probability, so q exceeds q_hat only on tokens that
    were not sent, which carry 1 - S of q's mass in total (docs/THEORY.md). The same quantity
    bounds the acceptance-rate bias |alpha(p, q) - alpha(p, q_hat)| and the per-position bias
    of the output law when a draft sampled from q is verified against q_hat.
    """
    s = np.asarray(kept_mass, dtype=np.float64)
    if np.any(np.isnan(s)):
        raise ValueError("kept_mass must not be NaN")
    return _as_scalar_or_array(np.clip(1.0 - s, 0.0, 1.0))


def one_step_output_law(p, q_draft, q_test) -> np.ndarray:
    """Exact law of the first emitted token of one speculative step.

    The draft token is sampled from ``q_draft``; the accept test ``min(1, p/q_test)`` and the
    residual ``norm(max(0, p - q_test))`` use ``q_test``. With ``q_test == q_draft`` this is
    ``p`` (lossless); otherwise ``TV(law, p) <= TV(q_draft, q_test)``. Last axis = vocabulary.
    """
    p = np.asarray(p, dtype=np.float64)
    qd = np.asarray(q_draft, dtype=np.float64)
    qt = np.asarray(q_test, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        accept = np.where(qt > 0, np.minimum(1.0, p / np.where(qt > 0, qt, 1.0)), 1.0)
    accepted = qd * accept
    p_reject = 1.0 - accepted.sum(axis=-1, keepdims=True)
    residual = np.maximum(p - qt, 0.0)
    z = residual.sum(axis=-1, keepdims=True)
    residual = np.where(z > 0, residual / np.where(z > 0, z, 1.0), p)
    return accepted + p_reject * residual


def alpha_from_counts(accepted: float, attempts: float) -> float:
    """Maximum-likelihood alpha from verification counts.

    Under the i.i.d. model each accept test succeeds with probability alpha, so the MLE is
    accepted tests / tests performed. In a round with gamma drafts of which n were accepted,
    ``attempts`` is n + 1 when a draft was rejected and gamma when all were accepted (the
    bonus token is not a test). Note that accepted/gamma would be biased low.
    """
    if attempts < 0 or accepted < 0 or accepted > attempts:
        raise ValueError(f"need 0 <= accepted <= attempts, got accepted={accepted}, attempts={attempts}")
    if attempts == 0:
        raise ValueError("attempts must be > 0 to estimate alpha")
    return float(accepted) / float(attempts)


# ---------------------------------------------------------------------------------------------
# Speedup model
# ---------------------------------------------------------------------------------------------

def round_time(gamma, a, b) -> float | np.ndarray:
    """T(gamma) = a * gamma + b (seconds per round)."""
    return _as_scalar_or_array(np.asarray(a, dtype=np.float64) * np.asarray(gamma, dtype=np.float64)
                               + np.asarray(b, dtype=np.float64))


def speedup(alpha, gamma, a, b) -> float | np.ndarray:
    """Speedup over target-only decoding (which costs b per token):

    ``b * (1 - alpha^(gamma+1)) / ((1 - alpha) * (a*gamma + b))``. Vectorised.
    """
    a_arr = np.asarray(a, dtype=np.float64)
    b_arr = np.asarray(b, dtype=np.float64)
    if np.any(~(a_arr >= 0)):
        raise ValueError("a (per-token cost) must be >= 0")
    if np.any(~(b_arr > 0)):
        raise ValueError("b (round cost) must be > 0")
    e = np.asarray(expected_tokens_per_step(alpha, gamma))
    return _as_scalar_or_array(b_arr * e / (a_arr * np.asarray(gamma, dtype=np.float64) + b_arr))


def _check_costs(a: float, b: float) -> tuple[float, float]:
    a = float(a)
    b = float(b)
    if not (math.isfinite(a) and a > 0):
        raise ValueError(f"a (per-token cost) must be a finite number > 0, got {a}")
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"b (round cost) must be a finite number > 0, got {b}")
    return a, b


def _solve_v(t: float) -> float:
    """The root v >= 0 of v - log1p(v) = t (t >= 0), i.e. u = 1 + v = -W_{-1}(-exp(-(1 + t))).

    Evaluated with scipy's lower-branch Lambert W, then polished with Newton steps in v (the
    branch point u = 1 is ill-conditioned in floating point: -exp(-1) may round past -1/e and
    give NaN, and exp(-(1+t)) underflows for t > ~700).
    """
    if t <= 0.0:
        return 0.0
    v = math.nan
    if t < 700.0:
        w = lambertw(-math.exp(-(1.0 + t)), k=-1)
        if np.isfinite(w.real) and abs(w.imag) < 1e-9:
            v = -float(w.real) - 1.0
    if not (math.isfinite(v) and v > 0.0):
        v = max(math.sqrt(2.0 * t), t + math.log1p(t))  # starting guess; Newton fixes the rest
    # h(v) = v - log1p(v) - t is increasing and convex for v > 0: Newton converges.
    for _ in range(100):
        h = v - math.log1p(v) - t
        dh = v / (1.0 + v)
        if dh <= 0.0:
            break
        step = h / dh
        v_new = v - step
        if v_new <= 0.0:
            v_new = v / 2.0
        if abs(v_new - v) <= 1e-15 * max(1.0, v):
            v = v_new
            break
        v = v_new
    return v


def optimal_gamma(alpha: float, a: float, b: float) -> float:
    """Throughput-optimal real draft length gamma* (>= 0) of ``speedup(alpha, ., a, b)``.

    ``gamma* = (-W_{-1}(-exp(-(1 + beta*d))) - 1)/beta - b/a`` with ``beta = -ln(alpha)``,
    ``d = b/a - 1``; 0 when that is negative (including every case b <= a, where drafting
    never pays). Edges: alpha <= 0 -> 0; alpha >= 1 -> inf when b > a (the speedup then grows
    without bound in gamma), else 0. a <= 0 or b <= 0 -> ValueError naming the argument.
    """
    a, b = _check_costs(a, b)
    alpha = float(alpha)
    if math.isnan(alpha):
        raise ValueError("alpha must not be NaN")
    if alpha <= 0.0:
        return 0.0
    if alpha >= 1.0:
        return math.inf if b > a else 0.0
    beta = -math.log(alpha)
    d = b / a - 1.0
    if d <= 0.0:
        return 0.0
    v = _solve_v(beta * d)  # v = -W_{-1}(-exp(-(1 + beta*d))) - 1
    g = v / beta - b / a
    return g if g > 0.0 else 0.0


def best_integer_gamma(alpha: float, a: float, b: float, gamma_max: int | None = None,
                       gamma_min: int = 0) -> int:
    """The integer draft length in [gamma_min, gamma_max] with the largest modelled speedup.

    The speedup is unimodal in gamma (docs/THEORY.md), so the best integer is floor or ceil of
    gamma*, clamped to the bounds; ties go to the shorter draft. If gamma* is infinite
    (alpha >= 1, b > a) gamma_max is returned, and a ValueError is raised without one.
    """
    if gamma_min < 0:
        raise ValueError(f"gamma_min must be >= 0, got {gamma_min}")
    if gamma_max is not None and gamma_max < gamma_min:
        raise ValueError(f"gamma_max ({gamma_max}) must be >= gamma_min ({gamma_min})")
    g = optimal_gamma(alpha, a, b)
    if math.isinf(g):
        if gamma_max is None:
            raise ValueError("gamma* is unbounded (alpha >= 1 and b > a); pass gamma_max")
        return int(gamma_max)
    hi = math.inf if gamma_max is None else int(gamma_max)

    def clamp(x: int) -> int:
        return int(min(max(x, gamma_min), hi))

    candidates = sorted({clamp(math.floor(g)), clamp(math.ceil(g))})
    al = min(max(float(alpha), 0.0), 1.0)
    best = candidates[0]
    best_s = float(speedup(al, best, a, b))
    for c in candidates[1:]:
        s = float(speedup(al, c, a, b))
        if s > best_s * (1.0 + 1e-12):
            best, best_s = c, s
    return best


# ---------------------------------------------------------------------------------------------
# Adaptive controller
# ---------------------------------------------------------------------------------------------

@dataclass
class LinkProfile:
    """A device's link: uplink bandwidth (bits/s) and round-trip time (s)."""

    uplink_bps: float = 10e6
    rtt_s: float = 0.02
    downlink_bps: float | None = None

    def __post_init__(self) -> None:
        if not (self.uplink_bps > 0 and math.isfinite(self.uplink_bps)):
            raise ValueError(f"uplink_bps must be a finite number > 0, got {self.uplink_bps}")
        if not (self.rtt_s >= 0 and math.isfinite(self.rtt_s)):
            raise ValueError(f"rtt_s must be a finite number >= 0, got {self.rtt_s}")


@dataclass
class ControllerConfig:
    """Settings of :class:`AdaptiveController` (defaults are sensible priors)."""

    gamma_init: int = 4
    gamma_min: int = 1
    gamma_max: int = 16
    k_init: int = 8
    k_candidates: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    k_max: int | None = 64
    vocab_size: int = 49152
    # weight of the newest measurement in every EMA (1.0: use only the latest)
    ema: float = 0.3
    # priors used before the first measurement
    alpha_prior: float = 0.8
    round_cost_prior: float = 0.1  # s, verify + engine overhead; the link's RTT is added
    draft_time_per_token_prior: float = 0.005  # s per drafted position (whole batch)
    kept_mass_at_k1_prior: float = 0.6  # prior S_1; prior S_K = 1 - (1 - S_1) * K**-decay
    kept_mass_decay: float = 0.5
    # d alpha / d S used to model alpha at an untried K (1.0 = the TV worst case)
    alpha_k_sensitivity: float = 0.5
    alpha_cap: float = 0.99  # modelled alpha never exceeds this (keeps gamma finite)
    # switch K only when the best modelled throughput beats the current K's by this fraction
    k_switch_margin: float = 0.02
    # the device drafts the next round while the server verifies (``draft-ahead``): rounds cost
    # ``ahead_cost.round_time_drafting_ahead`` instead of a * gamma + b
    drafts_ahead: bool = False

    def __post_init__(self) -> None:
        if self.gamma_min < 0:
            raise ValueError(f"gamma_min must be >= 0, got {self.gamma_min}")
        if self.gamma_max < max(self.gamma_min, 1):
            raise ValueError(f"gamma_max must be >= max(gamma_min, 1), got {self.gamma_max}")
        if not (self.gamma_min <= self.gamma_init <= self.gamma_max):
            raise ValueError(f"gamma_init must lie in [gamma_min, gamma_max], got {self.gamma_init}")
        self.k_candidates = tuple(sorted({int(k) for k in self.k_candidates}))
        if not self.k_candidates or self.k_candidates[0] < 1:
            raise ValueError(f"k_candidates must be positive integers, got {self.k_candidates}")
        if self.k_max is not None and self.k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {self.k_max}")
        if self.k_init < 1:
            raise ValueError(f"k_init must be >= 1, got {self.k_init}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if not (0.0 < self.ema <= 1.0):
            raise ValueError(f"ema must be in (0, 1], got {self.ema}")
        if not (0.0 <= self.alpha_prior <= 1.0):
            raise ValueError(f"alpha_prior must be in [0, 1], got {self.alpha_prior}")
        if not (0.0 < self.alpha_cap < 1.0):
            raise ValueError(f"alpha_cap must be in (0, 1), got {self.alpha_cap}")
        if self.round_cost_prior <= 0:
            raise ValueError(f"round_cost_prior must be > 0, got {self.round_cost_prior}")
        if self.draft_time_per_token_prior < 0:
            raise ValueError(f"draft_time_per_token_prior must be >= 0, got {self.draft_time_per_token_prior}")
        if not (0.0 < self.kept_mass_at_k1_prior <= 1.0):
            raise ValueError(f"kept_mass_at_k1_prior must be in (0, 1], got {self.kept_mass_at_k1_prior}")
        if self.kept_mass_decay < 0:
            raise ValueError(f"kept_mass_decay must be >= 0, got {self.kept_mass_decay}")
        if not (0.0 <= self.alpha_k_sensitivity <= 1.0):
            raise ValueError(f"alpha_k_sensitivity must be in [0, 1], got {self.alpha_k_sensitivity}")
        if self.k_switch_margin < 0:
            raise ValueError(f"k_switch_margin must be >= 0, got {self.k_switch_margin}")

    def allowed_k(self) -> tuple[int, ...]:
        """Candidate K values within k_max and the vocabulary (never empty)."""
        limit = self.vocab_size if self.k_max is None else min(self.k_max, self.vocab_size)
        ks = tuple(k for k in self.k_candidates if k <= limit)
        return ks or (min(self.k_candidates[0], limit),)


@dataclass
class Decision:
    """What the controller chose and why (for logs and reports)."""

    gamma: int
    k: int
    alpha: float  # modelled alpha at k
    per_token_cost: float  # a at k (s)
    round_cost: float  # b (s)
    throughput: float  # modelled tokens/s per sequence
    speedup: float  # modelled speedup over target-only decoding
    candidates: dict[int, tuple[int, float, float]] = field(default_factory=dict)  # k -> (gamma, alpha, tok/s)


class AdaptiveController:
    """Chooses (gamma, K) for one client each round from its measurements.

    Feed it with :meth:`observe` after every round, ask :meth:`decide` before the next one
    (:meth:`update` does both). Rule (docs/THEORY.md, "Adaptive controller"):

    * alpha_hat, b_hat, draft time per token: EMAs of the measurements (priors before any);
      S_hat[K]: EMA of the kept mass per K seen, a monotone prior for unseen K;
      S_ref: EMA of the kept mass in the rounds that produced alpha_hat.
    * for each candidate K: ``alpha_K = clip(alpha_hat + rho * (S_hat[K] - S_ref), 0, alpha_cap)``,
      ``a_K = draft_time_per_token + bytes_per_position(K) * sequences * 8 / uplink_bps``,
      ``gamma_K = best_integer_gamma(alpha_K, a_K, b_hat)`` clamped to [gamma_min, gamma_max],
      modelled throughput ``E[N](alpha_K, gamma_K) / (a_K gamma_K + b_hat)``.
    * K = the best candidate (the current K is kept unless another beats it by k_switch_margin),
      gamma = gamma_K.
    * ``drafts_ahead``: the device drafts the next round during the verify, so a round costs
      ``ahead_cost.round_time_drafting_ahead`` (``a``: its compute per batched step, ahead work
      included; ``b``: the server's time plus the exchange's latency) and gamma_K is the best
      integer by enumeration.
    """

    def __init__(self, config: ControllerConfig | None = None, link: LinkProfile | None = None) -> None:
        self.config = config or ControllerConfig()
        self.link = link or LinkProfile()
        cfg = self.config
        allowed = cfg.allowed_k()
        k0 = min(cfg.k_init, allowed[-1])
        self.gamma: int = cfg.gamma_init
        self.k: int = k0
        self.sequences: int = 1
        self.rounds_observed: int = 0
        self._alpha: float | None = None
        self._s_ref: float | None = None
        self._round_cost: float | None = None
        self._draft_time: float | None = None
        self._uplink_bps: float | None = None
        self._kept: dict[int, float] = {}
        self.last_decision: Decision | None = None

    # -- estimates -------------------------------------------------------------------------
    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1.0 - self.config.ema) * old + self.config.ema * new

    @property
    def alpha(self) -> float:
        """EMA of the measured alpha (the prior before any measurement)."""
        return self.config.alpha_prior if self._alpha is None else self._alpha

    @property
    def round_cost(self) -> float:
        """b: EMA of the measured per-round fixed cost, or prior + RTT."""
        if self._round_cost is None:
            return self.config.round_cost_prior + self.link.rtt_s
        return self._round_cost

    @property
    def draft_time_per_token(self) -> float:
        return self.config.draft_time_per_token_prior if self._draft_time is None else self._draft_time

    @property
    def uplink_bps(self) -> float:
        return self.link.uplink_bps if self._uplink_bps is None else self._uplink_bps

    def kept_mass(self, k: int) -> float:
        """S_hat[k]: EMA of measured kept mass at k, else a prior kept consistent with
        measurements (S is non-decreasing in K: bounded by the seen neighbours)."""
        k = int(k)
        if k in self._kept:
            return self._kept[k]
        cfg = self.config
        prior = 1.0 - (1.0 - cfg.kept_mass_at_k1_prior) * float(k) ** (-cfg.kept_mass_decay)
        lower = max((s for kk, s in self._kept.items() if kk < k), default=0.0)
        upper = min((s for kk, s in self._kept.items() if kk > k), default=1.0)
        if lower > upper:  # noisy measurements; stay between them
            return 0.5 * (lower + upper)
        return min(max(prior, lower), upper)

    def per_token_cost(self, k: int) -> float:
        """a_K (s): draft compute per position + uplink bytes per position / bandwidth."""
        bits = bytes_per_position(k, self.config.vocab_size) * self.sequences * 8.0
        return self.draft_time_per_token + bits / self.uplink_bps

    def modelled_alpha(self, k: int) -> float:
        cfg = self.config
        s_ref = self._s_ref if self._s_ref is not None else self.kept_mass(self.k)
        al = self.alpha + cfg.alpha_k_sensitivity * (self.kept_mass(k) - s_ref)
        return min(max(al, 0.0), cfg.alpha_cap)

    def throughput(self, gamma: int, k: int) -> float:
        """Modelled tokens per second per sequence at (gamma, k)."""
        a = self.per_token_cost(k)
        b = self.round_cost
        return float(expected_tokens_per_step(self.modelled_alpha(k), gamma)) / (a * gamma + b)

    # -- feedback --------------------------------------------------------------------------
    def forget_timing(self) -> None:
        """Drop the round-cost and draft-time estimates: the next measurement replaces them instead
        of being blended in (for a provisional estimate made from an atypical round)."""
        self._round_cost = None
        self._draft_time = None

    def observe(
        self,
        *,
        alpha: float | None = None,
        round_cost: float | None = None,
        round_wall_time: float | None = None,
        draft_time_per_token: float | None = None,
        kept_mass: float | None = None,
        k: int | None = None,
        gamma: int | None = None,
        sequences: int | None = None,
        uplink_bps: float | None = None,
        rtt_s: float | None = None,
    ) -> None:
        """Record one round's measurements (any subset).

        ``alpha``: measured acceptance rate (or agreement) this round. ``round_cost``: measured
        per-round fixed cost b (s). Alternatively ``round_wall_time``: the whole round, from
        which the modelled draft part ``a_K * gamma`` is subtracted (floored at 10% of the wall
        time). ``draft_time_per_token``: draft compute per drafted position (s, whole batch).
        ``kept_mass``: mean kept mass S of the top-K sent; ``k``/``gamma``: the values used this
        round (default: the last decided). ``sequences``: sequences drafted per round (scales
        the uplink bytes). ``uplink_bps``/``rtt_s``: measured link, EMA'd / replacing the profile.
        """
        k_used = self.k if k is None else int(k)
        g_used = self.gamma if gamma is None else int(gamma)
        if sequences is not None:
            if sequences < 1:
                raise ValueError(f"sequences must be >= 1, got {sequences}")
            self.sequences = int(sequences)
        if uplink_bps is not None:
            if not uplink_bps > 0:
                raise ValueError(f"uplink_bps must be > 0, got {uplink_bps}")
            self._uplink_bps = self._ema(self._uplink_bps, float(uplink_bps))
        if rtt_s is not None:
            if not rtt_s >= 0:
                raise ValueError(f"rtt_s must be >= 0, got {rtt_s}")
            self.link = LinkProfile(self.link.uplink_bps, float(rtt_s), self.link.downlink_bps)
        if draft_time_per_token is not None:
            if not draft_time_per_token >= 0:
                raise ValueError(f"draft_time_per_token must be >= 0, got {draft_time_per_token}")
            self._draft_time = self._ema(self._draft_time, float(draft_time_per_token))
        if kept_mass is not None:
            s = min(max(float(kept_mass), 0.0), 1.0)
            self._kept[k_used] = self._ema(self._kept.get(k_used), s)
        if alpha is not None:
            al = float(alpha)
            if math.isnan(al):
                raise ValueError("alpha must not be NaN")
            al = min(max(al, 0.0), 1.0)
            s_used = self.kept_mass(k_used) if kept_mass is None else min(max(float(kept_mass), 0.0), 1.0)
            self._alpha = self._ema(self._alpha, al)
            self._s_ref = self._ema(self._s_ref, s_used)
        if round_cost is None and round_wall_time is not None:
            wall = float(round_wall_time)
            round_cost = max(wall - self.per_token_cost(k_used) * g_used, 0.1 * wall)
        if round_cost is not None:
            rc = float(round_cost)
            if not (rc > 0 and math.isfinite(rc)):
                raise ValueError(f"round_cost must be a finite number > 0, got {round_cost}")
            self._round_cost = self._ema(self._round_cost, rc)
        self.rounds_observed += 1

    def decide(self) -> tuple[int, int]:
        """Choose (gamma, K) for the next round (see the class docstring for the rule)."""
        cfg = self.config
        b = self.round_cost
        cands: dict[int, tuple[int, float, float]] = {}
        for k in cfg.allowed_k():
            al = self.modelled_alpha(k)
            a = self.per_token_cost(k)
            if cfg.drafts_ahead:
                g = best_gamma_drafting_ahead(al, a, b, self.sequences, gamma_min=cfg.gamma_min,
                                              gamma_max=cfg.gamma_max)
                cands[k] = (g, al, throughput_drafting_ahead(al, g, a, b, self.sequences))
                continue
            if a > 0:
                g = best_integer_gamma(al, a, b, gamma_max=cfg.gamma_max, gamma_min=cfg.gamma_min)
            else:  # free drafts: as long as allowed (alpha < 1 so E[N] is still increasing)
                g = cfg.gamma_max
            tput = float(expected_tokens_per_step(al, g)) / (a * g + b)
            cands[k] = (g, al, tput)
        best_k = max(cands, key=lambda kk: (cands[kk][2], -kk))  # ties -> smaller K
        if self.k in cands and cands[self.k][2] * (1.0 + cfg.k_switch_margin) >= cands[best_k][2]:
            best_k = self.k
        g, al, tput = cands[best_k]
        self.k, self.gamma = best_k, g
        self.last_decision = Decision(
            gamma=g, k=best_k, alpha=al, per_token_cost=self.per_token_cost(best_k), round_cost=b,
            throughput=tput, speedup=tput * b, candidates=cands,
        )
        return g, best_k

    def update(self, **measurements) -> tuple[int, int]:
        """:meth:`observe` then :meth:`decide`."""
        self.observe(**measurements)
        return self.decide()
