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


# -- the report ---------------------------------------------------------------------------------------------


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
    from study_figures import plot_all, readme, verdict_table  # they read this module's numbers

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
