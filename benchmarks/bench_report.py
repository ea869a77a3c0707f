"""Turn the ranks' raw timings from bench_worker.py into per-step numbers, ratios, the cost model's check,
a markdown table and a plot. Also a CLI that merges several results.json files into one table and plot::

    python benchmarks/bench_report.py RESULTS.json [RESULTS.json ...] --out benchmarks/latest
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from localsgd_ds.cost_model import Link, Workload, fit_link, predict, ring_allreduce_bytes

MB = 1e6


def summary(values: list[float]) -> dict:
    """Median and spread of one measurement over rounds."""
    values = sorted(values)
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "min": values[0],
        "max": values[-1],
        "q1": q[0],
        "q3": q[2],
        "n": len(values),
    }


def slowest(ranks: list[dict], key: str) -> list[float]:
    """Per round, the slowest rank's seconds (synchronous training runs at the slowest worker's pace)."""
    return [max(r[key][i] for r in ranks) for i in range(len(ranks[0][key]))]


def windows(ranks: list[dict], get) -> list[dict]:
    """Per round, one window merged over ranks: the slowest rank's wall seconds (what the step costs), the
    least communication seconds of any rank (a rank that reaches a collective first also waits there for
    the others; that wait counts as compute imbalance, not transfer), rank 0's bytes."""
    per_rank = [get(r) for r in ranks]
    out = []
    for i in range(len(per_rank[0])):
        ws = [p[i] for p in per_rank]
        out.append(
            {
                "steps": ws[0]["steps"],
                "seconds": max(w["seconds"] for w in ws),
                "cpu_s": statistics.mean(w["cpu_s"] for w in ws),
                "comm_s": min(w["comm_s"] for w in ws),
                "bytes": ws[0]["bytes"],
            }
        )
    return out


def per_step(ws: list[dict], workers: int) -> dict:
    step = [w["seconds"] / w["steps"] for w in ws]
    comm = [w["comm_s"] / w["steps"] for w in ws]
    payload = ws[0]["bytes"] / ws[0]["steps"]
    return {
        "step_s": summary(step),
        "comm_s": summary(comm),
        "compute_s": summary([s - c for s, c in zip(step, comm)]),
        "comm_share": summary([c / s for s, c in zip(step, comm)]),
        "cpu_s": summary([w["cpu_s"] / w["steps"] for w in ws]),
        "payload_bytes": payload,
        "wire_bytes": ring_allreduce_bytes(payload, workers),
        "_step": step,
        "_cpu": [w["cpu_s"] / w["steps"] for w in ws],
    }


def ratio(a: list[float], b: list[float]) -> dict:
    return summary([x / y for x, y in zip(a, b)])


def timing_case(cfg: dict, ranks: list[dict], *, workers: int, transport: str, gbit, memory) -> dict:
    r0 = ranks[0]
    case: dict = {
        "model": cfg["model"],
        "workers": workers,
        "transport": transport,
        "link_gbit": gbit,
        "batch": cfg["batch"],
        "image_size": cfg["image_size"],
        "params": r0["params"],
        "param_bytes": r0["param_bytes"],
        "sync_bytes": r0["sync_bytes"],
        "threads_per_rank": r0["threads"],
        "config": {
            k: cfg.get(k)
            for k in (
                "hs",
                "rounds",
                "sync_rounds",
                "local_rounds",
                "window",
                "local_window",
                "malloc_no_trim",
            )
        },
    }

    # A local step vs a no-communication step, and a sync vs a raw all-reduce of the same bytes.
    # Neither side communicates, so each rank's pair (same core, same moment) is its own sample.
    def pooled(side: str, key: str) -> list[float]:
        return [w[key] / w["steps"] for r in ranks for w in r[side]]

    local, nocomm = pooled("local_window", "seconds"), pooled("nocomm_window", "seconds")
    local_cpu, nocomm_cpu = pooled("local_window", "cpu_s"), pooled("nocomm_window", "cpu_s")
    ds_nocomm, ds_nocomm_cpu = pooled("ds_nocomm_window", "seconds"), pooled("ds_nocomm_window", "cpu_s")
    case["local_step_s"], case["nocomm_step_s"] = summary(local), summary(nocomm)
    case["local_step_cpu_s"], case["nocomm_step_cpu_s"] = summary(local_cpu), summary(nocomm_cpu)
    case["ds_nocomm_step_s"], case["ds_nocomm_step_cpu_s"] = summary(ds_nocomm), summary(ds_nocomm_cpu)
    sync, raw = slowest(ranks, "sync_s"), slowest(ranks, "raw_allreduce_s")
    case["sync_s"], case["raw_allreduce_s"] = summary(sync), summary(raw)
    ratios = {
        "local_over_nocomm": ratio(local, nocomm),
        "local_over_nocomm_cpu": ratio(local_cpu, nocomm_cpu),
        "local_over_nocomm_of_minima": min(local) / min(nocomm),
        "local_over_ds_nocomm": ratio(local, ds_nocomm),
        "local_over_ds_nocomm_cpu": ratio(local_cpu, ds_nocomm_cpu),
        "sync_over_raw": ratio(sync, raw),
        "sync_over_raw_of_minima": min(sync) / min(raw),
    }
    if "raw_avg_allreduce_s" in r0:
        raw_avg = slowest(ranks, "raw_avg_allreduce_s")
        case["raw_avg_allreduce_s"] = summary(raw_avg)
        ratios["sync_over_raw_avg"] = ratio(sync, raw_avg)
        ratios["raw_avg_over_raw"] = ratio(raw_avg, raw)
    breakdown = r0.get("sync_breakdown")
    if breakdown is not None:
        parts = [r["sync_breakdown"] for r in ranks]
        keys = (
            "allreduce_sum_flat",
            "divide",
            "allreduce_mean_flat",
            "other_buffers_alone",
            "hook_order",
            "overlapped_chunks",
            "raw_allreduce",
        )
        raw_parts = slowest(parts, "raw_allreduce")
        case["sync_breakdown"] = {
            "flat_bytes": breakdown["flat_bytes"],
            "other_buffer_tensors": breakdown["other_buffer_count"],
            **{k: summary(slowest(parts, k)) for k in keys},
            "hook_order_over_raw": ratio(slowest(parts, "hook_order"), raw_parts),
            "overlapped_chunks_over_raw": ratio(slowest(parts, "overlapped_chunks"), raw_parts),
        }
    if "peer_sync_s" in r0:
        psync, praw = slowest(ranks, "peer_sync_s"), slowest(ranks, "peer_raw_allreduce_s")
        case["peer_sync_s"], case["peer_raw_allreduce_s"] = summary(psync), summary(praw)
        ratios["peer_sync_over_raw"] = ratio(psync, praw)
        ratios["sync_over_peer_sync"] = ratio(sync, psync)
    # The H sweep.
    steps: dict = {"msgd": None, "ours": {}, "peer": {}}
    per_round: dict = {}
    for i, entry in enumerate(r0["sweep"]):
        if entry["side"] == "calibration":  # per round and size, the slowest rank's seconds
            per_round["calibration"] = [
                [
                    (b, max(r["sweep"][i]["windows"][k]["seconds"][j] for r in ranks))
                    for j, b in enumerate(c["bytes"])
                ]
                for k, c in enumerate(entry["windows"])
            ]
            continue
        data = per_step(windows(ranks, lambda r, i=i: r["sweep"][i]["windows"]), workers)
        per_round[(entry["side"], entry["H"])] = data["_step"]
        if entry["side"] == "nocomm":
            case["sweep_nocomm_step_s"] = data["step_s"]
        elif entry["side"] == "msgd":
            steps["msgd"] = data
        else:
            steps[entry["side"]][str(entry["H"])] = data
    msgd_step = steps["msgd"].pop("_step")
    steps["msgd"].pop("_cpu")
    # Step time at H is a local step plus a sync every H steps. Composing the two from their own, longer
    # interleaved series gives the per-H comparison with the peer a much tighter spread than 5 windows.
    composed = None
    if "peer_local_window" in r0:
        per_step_of = lambda side: [w["seconds"] / w["steps"] for w in windows(ranks, lambda r: r[side])]  # noqa: E731
        lo, lp = per_step_of("local_window"), per_step_of("peer_local_window")
        case["peer_local_step_s"] = summary(lp)
        ratios["local_over_peer_local"] = ratio(lo, lp)
        n = min(len(lo), len(sync))
        composed = (lo[:n], lp[:n], sync[:n], slowest(ranks, "peer_sync_s")[:n])
    by_h: dict = {}
    for H, ours in steps["ours"].items():
        ours_step, ours_cpu = ours.pop("_step"), ours.pop("_cpu")
        by_h[H] = {"ours_over_msgd": ratio(ours_step, msgd_step)}
        if H in steps["peer"]:
            peer_step, peer_cpu = steps["peer"][H].pop("_step"), steps["peer"][H].pop("_cpu")
            by_h[H]["ours_over_peer"] = ratio(ours_step, peer_step)
            by_h[H]["ours_over_peer_cpu"] = ratio(ours_cpu, peer_cpu)
        if composed is not None:
            lo, lp, so, sp = composed
            h = int(H)
            by_h[H]["ours_over_peer_composed"] = summary(
                [(a + c / h) / (b + d / h) for a, b, c, d in zip(lo, lp, so, sp)]
            )
    case["steps"], ratios["by_H"] = steps, by_h
    case["ratios"] = ratios
    case["checks"] = {
        "local_steps_leave_ranks_different": all(r["local_steps_rank_params_differ"] for r in ranks),
        **{k: all(r["checks"][k] for r in ranks) for k in r0["checks"]},
    }
    calibration = per_round.pop("calibration")
    case["calibration"] = [
        {"bytes": b, "seconds": statistics.median(rnd[j][1] for rnd in calibration)}
        for j, (b, _) in enumerate(calibration[0])
    ]
    if memory is not None:
        case["memory"] = memory_summary(memory)
    case["cost_model"] = validate(case, per_round, calibration)
    return case


def memory_summary(ranks: list[dict]) -> dict:
    """The largest extra over ranks of each measurement, and the peak ratio of a sync over a step."""
    out: dict = {
        "method": "fresh process per rank, glibc mmap threshold 64 KiB (GLIBC_TUNABLES), malloc_trim, VmHWM reset "
        "through /proc/self/clear_refs, extra = VmHWM after the call - VmRSS before it; max over ranks",
        "param_bytes": ranks[0]["param_bytes"],
        "buffer_bytes": ranks[0]["buffer_bytes"],
        "bucket_bytes": ranks[0]["bucket_bytes"],
    }
    for key in ("ours_step", "ours_first_sync", "ours_sync", "peer_step", "peer_sync", "raw_allreduce"):
        out[key + "_extra_bytes"] = max(r[key]["extra"] for r in ranks)
    # Peak of the process over a period with a sync, over the peak of the same period without it.
    for who in ("ours", "peer"):
        sync_key = "ours_first_sync" if who == "ours" else "peer_sync"
        ratios = [
            max(r[f"{who}_step"]["peak"], r[sync_key]["peak"]) / r[f"{who}_step"]["peak"] for r in ranks
        ]
        out[f"{who}_peak_with_sync_over_without"] = max(ratios)
    return out


def validate(case: dict, per_round: dict, calibration: list) -> dict:
    """Predict each measured step of each sweep round from that round's no-communication step and a link
    fitted to that round's raw all-reduces (loopback), or the nominal tc rate with the fitted latency
    (veth + tc); the error of a row is the median over rounds of predicted / measured - 1."""
    workers = case["workers"]
    rows = [("msgd", None)] + [("ours", int(h)) for h in sorted(case["steps"]["ours"], key=int)]
    errors: dict = {row: [] for row in rows}
    predicted: dict = {row: [] for row in rows}
    links = []
    for k, samples in enumerate(calibration):
        fitted = fit_link(samples, workers)
        link = fitted if case["link_gbit"] is None else Link(case["link_gbit"], fitted.latency_s)
        links.append(fitted)
        work = Workload(
            compute_s=per_round[("nocomm", None)][k],
            grad_bytes=case["param_bytes"],
            sync_bytes=case["sync_bytes"],
            batch_per_worker=case["batch"],
        )
        for side, H in rows:
            p = predict(work, workers=workers, link=link, H=H).step_s
            predicted[(side, H)].append(p)
            errors[(side, H)].append(p / per_round[(side, H)][k] - 1)

    def measured(side: str, H: int | None) -> float:
        data = case["steps"]["msgd"] if side == "msgd" else case["steps"]["ours"][str(H)]
        return data["step_s"]["median"]

    out_rows = [
        {
            "side": side,
            "H": H,
            "measured_s": measured(side, H),
            "predicted_s": statistics.median(predicted[(side, H)]),
            "error": statistics.median(errors[(side, H)]),
            "error_min": min(errors[(side, H)]),
            "error_max": max(errors[(side, H)]),
        }
        for side, H in rows
    ]
    local = [abs(r["error"]) for r in out_rows if r["side"] == "ours"]
    fitted_gbit = statistics.median(f.gbit_per_s for f in links)
    fitted_latency = statistics.median(f.latency_s for f in links)
    link_gbit = fitted_gbit if case["link_gbit"] is None else case["link_gbit"]
    return {
        "link": {"gbit_per_s": link_gbit, "latency_s": fitted_latency},
        "fitted_link": {"gbit_per_s": fitted_gbit, "latency_s": fitted_latency},
        "bandwidth": "fitted per round to raw all-reduces"
        if case["link_gbit"] is None
        else "nominal tc rate",
        "rows": out_rows,
        "msgd_error": out_rows[0]["error"],
        "local_median_abs_error": statistics.median(local) if local else None,
        "local_max_abs_error": max(local) if local else None,
        "median_abs_error": statistics.median(abs(r["error"]) for r in out_rows),
        "max_abs_error": max(abs(r["error"]) for r in out_rows),
    }


def compute_case(cfg: dict, raw: dict) -> dict:
    return {
        "model": cfg["model"],
        "device": cfg["device"],
        "device_name": raw["device_name"],
        "batch": cfg["batch"],
        "image_size": cfg["image_size"],
        "compute_s": summary(raw["compute_step_s"]),
    }


# -- text -----------------------------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def _r(d: dict) -> str:
    return f"{d['median']:.3f} [{d['min']:.3f}-{d['max']:.3f}, n={d['n']}]"


def title(case: dict) -> str:
    if "compute_s" in case:
        return f"{case['model']} on {case['device_name']}, batch {case['batch']} of {case['image_size']}px"
    link = (
        "loopback gloo" if case["link_gbit"] is None else f"gloo over veth + tc {case['link_gbit']:g} Gbit/s"
    )
    link += ", glibc heap trimming off" if case["config"].get("malloc_no_trim") else ", default glibc malloc"
    return (
        f"{case['model']} ({case['params'] / 1e6:.1f} M params, {case['param_bytes'] / MB:.1f} MB), "
        f"K = {case['workers']}, {link}, batch {case['batch']} of {case['image_size']}x{case['image_size']}"
    )


def case_lines(case: dict) -> str:
    """The ratio lines printed after each case."""
    if "compute_s" in case:
        return f"[{title(case)}] compute per step {_ms(case['compute_s']['median'])} ms"
    r = case["ratios"]
    tag = f"[{case['model']} K={case['workers']} {case['transport']}]"
    lines = [
        f"{tag} local step / no-comm step: {_r(r['local_over_nocomm'])} (target <= 1.02; wall "
        f"{_ms(case['local_step_s']['median'])} vs {_ms(case['nocomm_step_s']['median'])} ms; "
        f"CPU time {_r(r['local_over_nocomm_cpu'])}; fastest over fastest {r['local_over_nocomm_of_minima']:.3f})",
        f"{tag} local step / DeepSpeed step with its all-reduce off and no hook: {_r(r['local_over_ds_nocomm'])} "
        f"(CPU time {_r(r['local_over_ds_nocomm_cpu'])}; {_ms(case['ds_nocomm_step_s']['median'])} ms)",
        f"{tag} sync / raw all-reduce of the same {case['sync_bytes'] / MB:.1f} MB: {_r(r['sync_over_raw'])} "
        f"(target <= 1.10; {_ms(case['sync_s']['median'])} vs {_ms(case['raw_allreduce_s']['median'])} ms; "
        f"fastest over fastest {r['sync_over_raw_of_minima']:.3f})",
    ]
    if "sync_over_raw_avg" in r:
        lines.append(
            f"{tag} the backend's own mean all-reduce (ReduceOp.AVG) of the same bytes / raw: "
            f"{_r(r['raw_avg_over_raw'])}; sync / that mean all-reduce: {_r(r['sync_over_raw_avg'])} "
            f"({_ms(case['raw_avg_allreduce_s']['median'])} ms)"
        )
    if "sync_breakdown" in case:
        sb = case["sync_breakdown"]
        b = {k: v["median"] for k, v in sb.items() if isinstance(v, dict)}
        lines.append(
            f"{tag} sync pieces (medians): sum all-reduce of {len(sb['flat_bytes'])} flat buffer(s) "
            f"{_ms(b['allreduce_sum_flat'])} + divide {_ms(b['divide'])} ms; as one mean all-reduce "
            f"{_ms(b['allreduce_mean_flat'])} ms; {sb['other_buffer_tensors']} other buffers alone "
            f"{_ms(b['other_buffers_alone'])} ms; both in the hook's order (other buffers started alongside) "
            f"{_ms(b['hook_order'])} ms vs one raw all-reduce {_ms(b['raw_allreduce'])} ms, ratio "
            f"{_r(sb['hook_order_over_raw'])}; not used: bucket-sized async chunks with the divide overlapped "
            f"{_ms(b['overlapped_chunks'])} ms, ratio {_r(sb['overlapped_chunks_over_raw'])}"
        )
    if "peer_sync_over_raw" in r:
        lines.append(
            f"{tag} PyTorch averager / raw all-reduce: {_r(r['peer_sync_over_raw'])}; "
            f"our sync / PyTorch averager: {_r(r['sync_over_peer_sync'])}"
        )
    if "local_over_peer_local" in r:
        lines.append(
            f"{tag} our local step / PyTorch's local step (DDP, no averaging): {_r(r['local_over_peer_local'])}"
        )
    for H, d in sorted(r["by_H"].items(), key=lambda kv: int(kv[0])):
        if "ours_over_peer" in d:
            lines.append(
                f"{tag} H={H}: our step / PyTorch post-local SGD step (target <= 1.0): windows "
                f"{_r(d['ours_over_peer'])}; CPU time {_r(d['ours_over_peer_cpu'])}; local step + sync/H "
                f"{_r(d['ours_over_peer_composed'])}"
            )
    if "memory" in case:
        m = case["memory"]
        lines.append(
            f"{tag} memory a sync adds: ours {m['ours_first_sync_extra_bytes'] / MB:.1f} MB first sync "
            f"(bucket bound {m['bucket_bytes'] / MB:.1f} MB), {m['ours_sync_extra_bytes'] / MB:.1f} MB later; PyTorch "
            f"{m['peer_sync_extra_bytes'] / MB:.1f} MB; full flat copy {m['param_bytes'] / MB:.1f} MB; "
            f"peak with a sync / without: ours {m['ours_peak_with_sync_over_without']:.3f}, "
            f"PyTorch {m['peer_peak_with_sync_over_without']:.3f}"
        )
    v = case["cost_model"]
    fitted = v["fitted_link"]["gbit_per_s"]
    local = (
        f"local SGD rows median |error| {v['local_median_abs_error']:.1%}, max {v['local_max_abs_error']:.1%}; "
        if v["local_median_abs_error"] is not None
        else ""
    )
    lines.append(
        f"{tag} cost model ({v['bandwidth']}: {v['link']['gbit_per_s']:.2f} Gbit/s"
        f"{'' if case['link_gbit'] is None else f' (fitted {fitted:.2f})'}, "
        f"{v['link']['latency_s'] * 1e6:.0f} us/hop; compute = the no-communication step of the same round): "
        f"{local}mSGD row error {v['msgd_error']:+.1%}"
    )
    checks = ", ".join(f"{k}={v}" for k, v in case["checks"].items())
    lines.append(f"{tag} checks: {checks}")
    return "\n".join(lines)


def case_table(case: dict) -> str:
    steps, by_h = case["steps"], case["ratios"]["by_H"]
    predicted = {(r["side"], r["H"]): r for r in case["cost_model"]["rows"]}
    lines = [
        "| method | H | step ms, median [min-max] | compute ms | comm ms | comm share | MB sent per step "
        "(payload / ring wire) | ours / PyTorch: windows / local step + sync/H | cost model ms (error) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(name: str, H, s: dict, vs_peer: str, key) -> None:
        st = s["step_s"]
        p = predicted.get(key)
        model = f"{_ms(p['predicted_s'])} ({p['error']:+.1%})" if p else ""
        lines.append(
            f"| {name} | {H if H is not None else ''} | {_ms(st['median'])} [{_ms(st['min'])}-{_ms(st['max'])}] "
            f"| {_ms(s['compute_s']['median'])} | {_ms(s['comm_s']['median'])} | {s['comm_share']['median']:.1%} "
            f"| {s['payload_bytes'] / MB:.2f} / {s['wire_bytes'] / MB:.2f} | {vs_peer} | {model} |"
        )

    row("mSGD (plain DeepSpeed)", None, steps["msgd"], "", ("msgd", None))
    for H in sorted(steps["ours"], key=int):
        vs, composed = by_h[H].get("ours_over_peer"), by_h[H].get("ours_over_peer_composed")
        text = f"{vs['median']:.3f}" if vs else ""
        text += f" / {composed['median']:.3f}" if composed else ""
        row("local SGD (localsgd_ds)", H, steps["ours"][H], text, ("ours", int(H)))
        if H in steps["peer"]:
            row("local SGD (PyTorch post-local SGD)", H, steps["peer"][H], "", None)
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m = results["machine"]
    out = [
        "# Communication benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}, "
        f"torch {m['torch']}, DeepSpeed {m['deepspeed']}; one thread per rank; the machine was shared with other "
        "people's test suites (load average per run below). Ratios: median over interleaved rounds of the "
        "per-round ratio, [min-max, n].",
    ]
    for case in results["cases"]:
        out += ["", f"## {title(case)}", ""]
        run = case.get("run")
        if run:
            out += [
                f"Run {run['date']}, load average {run['load_average_start']:.1f} -> {run['load_average_end']:.1f}, "
                f"localsgd_ds {run['localsgd_ds']}, `python benchmarks/bench_comm.py {' '.join(run['argv'])}`",
                "",
            ]
        if "compute_s" in case:
            s = case["compute_s"]
            out.append(f"compute per step: {_ms(s['median'])} ms [{_ms(s['min'])}-{_ms(s['max'])}]")
            continue
        out += ["```", case_lines(case), "```", ""]
        if case["steps"]["msgd"] is not None:
            out.append(case_table(case))
    return "\n".join(out) + "\n"


def annotate_runs(results: dict) -> None:
    """Give each case the date, load, hook state and command of its run (for tables merged from runs)."""
    m = results["machine"]
    for case in results["cases"]:
        case.setdefault(
            "run",
            {
                "date": m["date"],
                "load_average_start": m["load_average_start"][0],
                "load_average_end": m.get("load_average_end", m["load_average_start"])[0],
                "localsgd_ds": m.get("localsgd_ds") or "not recorded",
                "argv": results["argv"],
            },
        )


def plot(results: dict, path: Path) -> bool:
    """Step time and communication share against H, ours and PyTorch's, one column per case."""
    cases = [c for c in results["cases"] if "steps" in c and c["steps"]["ours"]]
    if not cases:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(cases), figsize=(3.6 * len(cases), 6), squeeze=False, sharex=True)
    for col, case in enumerate(cases):
        top, bottom = axes[0][col], axes[1][col]
        for side, label, style in (("ours", "localsgd_ds", "o-"), ("peer", "PyTorch post-local SGD", "s--")):
            data = case["steps"][side]
            if not data:
                continue
            hs = sorted(data, key=int)
            x = [int(h) for h in hs]
            med = [data[h]["step_s"]["median"] * 1e3 for h in hs]
            lo = [m - data[h]["step_s"]["min"] * 1e3 for m, h in zip(med, hs)]
            hi = [data[h]["step_s"]["max"] * 1e3 - m for m, h in zip(med, hs)]
            top.errorbar(x, med, yerr=[lo, hi], fmt=style, capsize=2, label=label, markersize=4)
            bottom.plot(
                x, [data[h]["comm_share"]["median"] * 100 for h in hs], style, label=label, markersize=4
            )
        msgd = case["steps"]["msgd"]
        top.axhline(msgd["step_s"]["median"] * 1e3, color="gray", ls=":", label="mSGD (DeepSpeed)")
        top.axhline(
            case["nocomm_step_s"]["median"] * 1e3, color="k", ls="-", lw=0.5, label="no communication"
        )
        bottom.axhline(msgd["comm_share"]["median"] * 100, color="gray", ls=":", label="mSGD (DeepSpeed)")
        link = "loopback" if case["link_gbit"] is None else f"{case['link_gbit']:g} Gbit/s"
        top.set_title(f"{case['model']} K={case['workers']} {link}", fontsize=9)
        top.set_ylabel("step time (ms)")
        bottom.set_ylabel("communication share (%)")
        bottom.set_xlabel("H (local steps per sync)")
        bottom.set_xscale("log", base=2)
        top.set_ylim(bottom=0)
        bottom.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description="merge bench_comm.py results into one table and plot")
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    merged: dict | None = None
    for path in args.results:
        res = json.loads(path.read_text())
        annotate_runs(res)
        if merged is None:
            merged = res
        else:
            merged["cases"] += res["cases"]
            merged["argv"] = merged["argv"] + ["+", *res["argv"]]
            merged["machine"]["load_average_end"] = res["machine"]["load_average_end"]
    assert merged is not None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(markdown(merged))
    plot(merged, args.out / "plot.png")
    print(f"wrote {args.out / 'table.md'} and {args.out / 'plot.png'}")


if __name__ == "__main__":
    main()
