"""The verdict rules of the study: for each claim of "Trade-offs of Local SGD at Scale" (Gonzalez Ortiz,
Frankle, Rabbat, Morcos, Ballas, 2021), a pure function from measured numbers to "reproduced", "partly" or
"not reproduced", with its rule as text. Written and committed before any study result was looked at (see
``git log -- recipes/study_rules.py``); ``recipes/study.py`` gathers the numbers from the runs and calls them::

    verdict = claim2_rule({(1, 4): [97.1, 97.3, 97.0], (4, 4): [96.8, 96.5, 96.9], ...})
    verdict.verdict, verdict.rule, verdict.evidence

Accuracies are final top-1 in percent, one value per seed. "Clearly higher" everywhere means: the mean is
higher and a one-sided Welch t-test over the seeds gives p < 0.05 (``clearly_greater``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

REPRODUCED, PARTLY, NOT_REPRODUCED = "reproduced", "partly", "not reproduced"
P_CLEAR = 0.05

CLAIMS = {
    1: "Minibatch SGD (H=1) spends the majority of the time communicating, whereas local SGD amortizes "
    "communication across several iterations.",
    2: "As either the number of workers K or the number of local steps H increases, final model accuracy "
    "decreases.",
    3: "The accuracy-communication trade-off is closely related to the product of H and K, i.e. the total "
    "number of local model updates between synchronizations.",
    4: "The switching point in post-local SGD presents a trade-off between training time and final accuracy.",
    5: "The choice of learning rate schedule has a large impact for the final accuracy of post-local SGD.",
    6: "Switching to local SGD has a regularization effect on optimization that is beneficial in the short "
    "term, but ends up being detrimental to final model accuracy.",
    7: "Regardless of when the switch to local SGD is performed, the loss and error curves follow the same "
    "general trajectory.",
    8: "Slow momentum consistently improves accuracy without requiring additional communication.",
}


@dataclass(frozen=True)
class Verdict:
    """One claim's verdict, the rule that produced it (as text) and the numbers it was computed from."""

    verdict: str
    rule: str
    evidence: dict[str, Any] = field(default_factory=dict)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def p_greater(a: Sequence[float], b: Sequence[float]) -> float:
    """One-sided Welch t-test p-value for mean(a) > mean(b). Without spread on both sides: 0 if the means
    differ in that direction, else 1."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or b.size < 2 or (a.std() == 0 and b.std() == 0):
        return 0.0 if a.mean() > b.mean() else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)


def clearly_greater(a: Sequence[float], b: Sequence[float]) -> bool:
    """mean(a) > mean(b) and the one-sided Welch p-value is below ``P_CLEAR``."""
    return float(np.mean(a)) > float(np.mean(b)) and p_greater(a, b) < P_CLEAR


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get mean ranks); 0 when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(stats.spearmanr(x, y).statistic)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


# -- claim 1: where the time goes (measured benchmark + cost model; no accuracy involved) ---------------------

CLAIM1_RULE = (
    "Inputs: the communication share of an mSGD step and of a local SGD step with H = 8, measured "
    "(benchmarks/latest/table.md: every setting, loopback and 1 Gbit/s veth + tc) and modelled "
    "(localsgd_ds.cost_model, ResNet-50, K in {16, 64, 256} x {10, 25, 100} Gbit/s, the stated compute "
    "time). 'Amortizes' holds where H = 8's communication time per step is at most 1/4 of mSGD's. "
    "'Majority' holds where mSGD's share is > 50%. reproduced: amortizes everywhere, and majority in the "
    "measured bandwidth-limited link (1 Gbit/s) and in at least half of the modelled settings; partly: "
    "amortizes everywhere and majority somewhere; not reproduced: otherwise."
)


def claim1_rule(measured: Sequence[Mapping[str, Any]], modelled: Sequence[Mapping[str, Any]]) -> Verdict:
    """Each row: ``setting`` (text), ``msgd_share``, ``local_share`` (H = 8), ``msgd_comm_ms``,
    ``local_comm_ms`` (per step); measured rows also ``limited_link`` (bool: a bandwidth-limited link)."""
    rows = list(measured) + list(modelled)
    amortizes = [r["local_comm_ms"] <= r["msgd_comm_ms"] / 4 for r in rows]
    majority_limited = [r["msgd_share"] > 0.5 for r in measured if r.get("limited_link")]
    majority_model = [r["msgd_share"] > 0.5 for r in modelled]
    majority_any = any(r["msgd_share"] > 0.5 for r in rows)
    if (
        rows
        and all(amortizes)
        and majority_limited
        and all(majority_limited)
        and sum(majority_model) * 2 >= len(majority_model) > 0
    ):
        verdict = REPRODUCED
    elif rows and all(amortizes) and majority_any:
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    evidence = {
        "amortizes_everywhere": bool(rows) and all(amortizes),
        "majority_on_limited_link": majority_limited,
        "majority_in_model": f"{sum(majority_model)} of {len(majority_model)} modelled settings",
        "measured": list(measured),
        "modelled": list(modelled),
    }
    return Verdict(verdict, CLAIM1_RULE, evidence)


# -- claim 2: accuracy falls with H and with K -----------------------------------------------------------------

CLAIM2_RULE = (
    "Grid of (H, K) points (H = 1 is mSGD), final top-1 over seeds. Lines: each fixed K along H, each "
    "fixed H along K. Adjacent pairs: neighbouring values on a line; end pairs: smallest vs largest value "
    "on a line. reproduced: every adjacent pair has a lower mean at the larger H or K, and every end pair "
    "is clearly lower (one-sided Welch p < 0.05); partly: at least 2/3 of adjacent pairs lower and at "
    "least half of the end pairs clearly lower; not reproduced: otherwise."
)


def _lines(points: Mapping[tuple[int, int], Sequence[float]]) -> list[tuple[str, list[tuple[int, int]]]]:
    Hs = sorted({h for h, _ in points})
    Ks = sorted({k for _, k in points})
    lines = []
    for K in Ks:
        line = [(h, K) for h in Hs if (h, K) in points]
        if len(line) > 1:
            lines.append((f"K={K}, along H", line))
    for H in Hs:
        line = [(H, k) for k in Ks if (H, k) in points]
        if len(line) > 1:
            lines.append((f"H={H}, along K", line))
    return lines


def claim2_rule(points: Mapping[tuple[int, int], Sequence[float]]) -> Verdict:
    """``points[(H, K)]``: final top-1 per seed."""
    adjacent, ends = [], []
    for name, line in _lines(points):
        for a, b in zip(line, line[1:]):
            adjacent.append(
                {"line": name, "from": a, "to": b, "lower": bool(np.mean(points[b]) < np.mean(points[a]))}
            )
        lo, hi = line[0], line[-1]
        ends.append(
            {
                "line": name,
                "from": lo,
                "to": hi,
                "drop": float(np.mean(points[lo]) - np.mean(points[hi])),
                "p": p_greater(points[lo], points[hi]),
                "clear": clearly_greater(points[lo], points[hi]),
            }
        )
    n_lower = sum(a["lower"] for a in adjacent)
    n_clear = sum(e["clear"] for e in ends)
    if adjacent and n_lower == len(adjacent) and n_clear == len(ends):
        verdict = REPRODUCED
    elif adjacent and 3 * n_lower >= 2 * len(adjacent) and 2 * n_clear >= len(ends):
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    evidence = {
        "adjacent_pairs_lower": f"{n_lower} of {len(adjacent)}",
        "end_pairs_clearly_lower": f"{n_clear} of {len(ends)}",
        "adjacent": adjacent,
        "ends": ends,
    }
    return Verdict(verdict, CLAIM2_RULE, evidence)


# -- claim 3: H x K orders the runs --------------------------------------------------------------------------

CANDIDATES = {
    "H": lambda H, K: H,
    "K": lambda H, K: K,
    "H x K": lambda H, K: H * K,
    "H x K^2": lambda H, K: H * K * K,
    "H^2 x K": lambda H, K: H * H * K,
    "H + K": lambda H, K: H + K,
    "H x sqrt(K)": lambda H, K: H * math.sqrt(K),
}
CLAIM3_RULE = (
    "Over the (H, K) points (H = 1 is mSGD), the Spearman rank correlation between each candidate "
    f"quantity ({', '.join(CANDIDATES)}) and the mean final top-1; score = -rho (accuracy falls as the "
    "quantity grows). reproduced: score(H x K) >= 0.8 and within 0.05 of the best candidate's score; "
    "partly: score(H x K) >= 0.6 and above both H alone and K alone; not reproduced: otherwise."
)


def claim3_rule(points: Mapping[tuple[int, int], Sequence[float]]) -> Verdict:
    keys = sorted(points)
    means = [float(np.mean(points[k])) for k in keys]
    scores = {
        name: -spearman([f(H, K) for H, K in keys], means) for name, f in CANDIDATES.items()
    }  # fmt: skip
    # The same over single runs (every seed a point), as a check of the ordering's robustness.
    run_keys = [k for k in keys for _ in points[k]]
    run_values = [v for k in keys for v in points[k]]
    run_scores = {
        name: -spearman([f(H, K) for H, K in run_keys], run_values) for name, f in CANDIDATES.items()
    }
    best = max(scores, key=scores.get)
    hk = scores["H x K"]
    if hk >= 0.8 and hk >= scores[best] - 0.05:
        verdict = REPRODUCED
    elif hk >= 0.6 and hk > scores["H"] and hk > scores["K"]:
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    evidence = {
        "score_per_candidate_over_point_means": scores,
        "score_per_candidate_over_runs": run_scores,
        "best_candidate": best,
        "points": {f"H={H},K={K}": mean_std(points[(H, K)]) for H, K in keys},
    }
    return Verdict(verdict, CLAIM3_RULE, evidence)


# -- claim 4: the switching point trades time for accuracy -----------------------------------------------------

CLAIM4_RULE = (
    "Post-local SGD at fixed H and K with switch epochs T (T = 0: local SGD from the start; 'never' = "
    "mSGD, counted as T = epochs). Time: the cost model's time of the whole run (mSGD epochs before T, "
    "local epochs after). reproduced: modelled time increases strictly with T, the Spearman correlation "
    "of T with mean final top-1 is >= 0.8, and mSGD is clearly more accurate than T = 0 (one-sided Welch "
    "p < 0.05); partly: time increases with T and either the correlation is >= 0.5 or mSGD is clearly "
    "more accurate than T = 0; not reproduced: otherwise."
)


def claim4_rule(arms: Mapping[int, Sequence[float]], modelled_minutes: Mapping[int, float]) -> Verdict:
    """``arms[T]``: final top-1 per seed, T = epochs for mSGD; ``modelled_minutes[T]`` the run's time."""
    Ts = sorted(arms)
    times = [modelled_minutes[T] for T in Ts]
    time_increases = all(b > a for a, b in zip(times, times[1:]))
    rho = spearman(Ts, [float(np.mean(arms[T])) for T in Ts])
    first, last = Ts[0], Ts[-1]
    clear = clearly_greater(arms[last], arms[first])
    if time_increases and rho >= 0.8 and clear:
        verdict = REPRODUCED
    elif time_increases and (rho >= 0.5 or clear):
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    evidence = {
        "T": Ts,
        "top1_mean_std": {str(T): mean_std(arms[T]) for T in Ts},
        "modelled_minutes": {str(T): modelled_minutes[T] for T in Ts},
        "spearman_T_top1": rho,
        "msgd_vs_T0_p": p_greater(arms[last], arms[first]),
        "time_increases_with_T": time_increases,
    }
    return Verdict(verdict, CLAIM4_RULE, evidence)


# -- claim 5: the LR schedule matters for post-local SGD ---------------------------------------------------

CLAIM5_RULE = (
    "Post-local SGD at fixed H, K, T under several LR schedules (step vs cosine decay, warmup lengths), "
    "final top-1 over seeds. range = best arm mean - worst arm mean. reproduced: range >= 1.0 point and "
    "the best arm is clearly above the worst (one-sided Welch p < 0.05); partly: exactly one of the two; "
    "not reproduced: neither."
)


def claim5_rule(arms: Mapping[str, Sequence[float]]) -> Verdict:
    means = {name: float(np.mean(v)) for name, v in arms.items()}
    best, worst = max(means, key=means.get), min(means, key=means.get)
    spread = means[best] - means[worst]
    clear = clearly_greater(arms[best], arms[worst])
    large = spread >= 1.0
    verdict = REPRODUCED if large and clear else PARTLY if large or clear else NOT_REPRODUCED
    evidence = {
        "top1_mean_std": {name: mean_std(v) for name, v in arms.items()},
        "best": best,
        "worst": worst,
        "range_points": spread,
        "best_vs_worst_p": p_greater(arms[best], arms[worst]),
    }
    return Verdict(verdict, CLAIM5_RULE, evidence)


# -- claim 6: short-term benefit, long-term harm ---------------------------------------------------------------

CLAIM6_RULE = (
    "For each switch epoch T, against mSGD with the same seeds: short-term gain = mean top-1 over the "
    "(up to) 2 epochs after the switch minus mSGD's at the same epochs; final gap = final top-1 minus "
    "mSGD's. Pattern at T: short-term gain > 0 and final gap < 0 (means over seeds). reproduced: the "
    "pattern at every T and, at one T or more, both halves clear (one-sided Welch p < 0.05); partly: the "
    "pattern at some T, or one half (gain > 0 or gap < 0) at every T; not reproduced: otherwise."
)


def claim6_rule(
    post: Mapping[int, Sequence[Sequence[float]]], msgd: Sequence[Sequence[float]], epochs: int
) -> Verdict:
    """``post[T]``: per seed, the top-1 curve (one value per epoch, epoch 1 first); ``msgd``: the same for
    mSGD."""
    rows, patterns, clears, gains, gaps = [], [], [], [], []
    for T in sorted(post):
        window = [e for e in (T + 1, T + 2) if e <= epochs]
        short_post = [float(np.mean([c[e - 1] for e in window])) for c in post[T]]
        short_msgd = [float(np.mean([c[e - 1] for e in window])) for c in msgd]
        final_post = [c[epochs - 1] for c in post[T]]
        final_msgd = [c[epochs - 1] for c in msgd]
        gain = float(np.mean(short_post) - np.mean(short_msgd))
        gap = float(np.mean(final_post) - np.mean(final_msgd))
        pattern = gain > 0 and gap < 0
        both_clear = clearly_greater(short_post, short_msgd) and clearly_greater(final_msgd, final_post)
        rows.append(
            {
                "T": T,
                "epochs_after_switch": window,
                "short_term_gain": gain,
                "short_term_p": p_greater(short_post, short_msgd),
                "final_gap": gap,
                "final_p": p_greater(final_msgd, final_post),
                "pattern": pattern,
            }
        )
        patterns.append(pattern)
        clears.append(pattern and both_clear)
        gains.append(gain > 0)
        gaps.append(gap < 0)
    if patterns and all(patterns) and any(clears):
        verdict = REPRODUCED
    elif patterns and (any(patterns) or all(gains) or all(gaps)):
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    return Verdict(verdict, CLAIM6_RULE, {"per_T": rows})


# -- claim 7: the same general trajectory -------------------------------------------------------------------

CLAIM7_RULE = (
    "For each switch epoch T (local SGD from the start, post-local SGD, and mSGD), the mean curves over "
    "seeds of log top-1 error and log train loss from epoch 2 on; r = Pearson correlation of each arm's "
    "curve with mSGD's. This tests the shape of the curves, not their level. reproduced: r >= 0.95 for "
    "every arm and both curves; partly: r >= 0.8 for all; not reproduced: otherwise."
)


def claim7_rule(
    error_curves: Mapping[str, Sequence[float]], loss_curves: Mapping[str, Sequence[float]], reference: str
) -> Verdict:
    """Mean curves per arm (epoch 1 first); ``reference``: the mSGD arm's name."""

    def r(curves: Mapping[str, Sequence[float]], arm: str) -> float:
        ref = np.log(np.maximum(np.asarray(curves[reference][1:], dtype=float), 1e-6))
        own = np.log(np.maximum(np.asarray(curves[arm][1:], dtype=float), 1e-6))
        return pearson(own, ref)

    arms = [a for a in error_curves if a != reference]
    rs = {a: {"error": r(error_curves, a), "loss": r(loss_curves, a)} for a in arms}
    lowest = min((min(v.values()) for v in rs.values()), default=0.0)
    verdict = REPRODUCED if arms and lowest >= 0.95 else PARTLY if arms and lowest >= 0.8 else NOT_REPRODUCED
    return Verdict(verdict, CLAIM7_RULE, {"pearson_vs_msgd": rs, "lowest": lowest})


# -- claim 8: SlowMo improves accuracy at equal communication -----------------------------------------------------

CLAIM8_RULE = (
    "At each (H, K) setting, local SGD and SlowMo (beta as configured, alpha = 1), each at its own tuned "
    "learning rate (the tuning procedure is stated with the numbers), final top-1 over seeds and the bytes "
    "each sent. Equal bytes: SlowMo's bytes per run within 0.1% of local SGD's. reproduced: equal bytes, "
    "SlowMo's mean higher at every setting and clearly higher (one-sided Welch p < 0.05) at one or more; "
    "partly: equal bytes and SlowMo's mean higher at some setting; not reproduced: otherwise."
)


def claim8_rule(settings: Sequence[Mapping[str, Any]]) -> Verdict:
    """Each setting: ``name``, ``local`` and ``slowmo`` (final top-1 per seed), ``local_bytes`` and
    ``slowmo_bytes`` (bytes sent per run, mean over seeds)."""
    rows = []
    for s in settings:
        rows.append(
            {
                "setting": s["name"],
                "local_top1": mean_std(s["local"]),
                "slowmo_top1": mean_std(s["slowmo"]),
                "gain": float(np.mean(s["slowmo"]) - np.mean(s["local"])),
                "p": p_greater(s["slowmo"], s["local"]),
                "higher": bool(np.mean(s["slowmo"]) > np.mean(s["local"])),
                "clear": clearly_greater(s["slowmo"], s["local"]),
                "equal_bytes": abs(s["slowmo_bytes"] - s["local_bytes"]) <= 1e-3 * max(s["local_bytes"], 1),
                "local_bytes": s["local_bytes"],
                "slowmo_bytes": s["slowmo_bytes"],
            }
        )
    equal = bool(rows) and all(r["equal_bytes"] for r in rows)
    if equal and all(r["higher"] for r in rows) and any(r["clear"] for r in rows):
        verdict = REPRODUCED
    elif equal and any(r["higher"] for r in rows):
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    return Verdict(verdict, CLAIM8_RULE, {"settings": rows})
