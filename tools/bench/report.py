"""The benchmark's report: ratios between modes, the printed table and the JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Figures = dict[str, Any]

HEADER = f"{'mode':<24}{'fps':>8}{'faces/s':>9}{'p50':>8}{'p95':>8}{'p99':>8}{'cpu%':>7}{'rss MB':>8}  stages ms/frame"


def ratio(a: Figures | None, b: Figures | None) -> float | None:
    """frames/s of ``a`` over ``b``; None when either is missing."""
    if not a or not b or not b.get("fps"):
        return None
    return round(a["fps"] / b["fps"], 2)


def ratios(report: dict[str, Any]) -> dict[str, float | None]:
    scaling = (report.get("system") or {}).get("scaling") or {}
    return {
        "pipeline_vs_naive": ratio(report.get("pipeline"), report.get("naive")),
        "system_vs_pipeline": ratio(report.get("system"), report.get("pipeline")),
        "two_workers_vs_one": ratio(scaling.get("2"), scaling.get("1")),
    }


def _rows(report: dict[str, Any]) -> list[tuple[str, Figures | None]]:
    rows = [("naive", report.get("naive")), ("naive_bbox", report.get("naive_bbox"))]
    rows.append(("pipeline", report.get("pipeline")))
    for name, fig in (report.get("detectors") or {}).items():
        rows.append((f"pipeline[{name}]", fig))
    system = report.get("system") or {}
    rows.append((f"system max W={system.get('workers', '?')}", system or None))
    for w, fig in (system.get("scaling") or {}).items():
        rows.append((f"system max W={w} 1thr", fig))
    rows.append(("system fixed rate", system.get("fixed_rate")))
    return rows


def _row(name: str, fig: Figures) -> str:
    lat = fig["latency_ms"]
    stages = " ".join(f"{k}={v:g}" for k, v in fig["stages_ms"].items())
    return (
        f"{name:<24}{fig['fps']:>8.1f}{fig['faces_per_s']:>9.1f}{lat['p50']:>8.1f}{lat['p95']:>8.1f}"
        f"{lat['p99']:>8.1f}{fig['cpu_percent']:>7.0f}{fig['rss_mb']:>8.0f}  {stages}"
    )


def _footer(report: dict[str, Any]) -> list[str]:
    """The ratios, what else the machine was doing, and whether naive and pipeline agreed."""
    found = report.get("ratios", {})
    lines = [
        "ratios: pipeline/naive={} system/pipeline={} two_workers/one={}".format(
            found.get("pipeline_vs_naive"), found.get("system_vs_pipeline"), found.get("two_workers_vs_one")
        )
    ]
    for when in ("host_before", "host_after"):
        host = report.get(when)
        if host:
            busy = "; ".join(f"{p['cpu_percent']:.0f}% {p['cmd'][:60]}" for p in host["busy_processes"])
            busy = busy or host.get("note") or "none"
            lines.append(f"{when}: load {host['load_avg']} on {host['cpus']} cpus; busy: {busy}")
    ident = report.get("identical")
    if ident:
        lines.append(
            f"naive vs pipeline outputs: identical={ident['identical']} "
            f"({ident['boxes_equal']}/{ident['faces_compared']} boxes, {ident['labels_equal']} labels, "
            f"max prob diff {ident['max_prob_diff']})"
        )
    return lines


def table(report: dict[str, Any]) -> str:
    """The report as printed: one row per mode, then the ratios and the host's load."""
    lines = [HEADER, "-" * len(HEADER)]
    lines += [_row(name, fig) for name, fig in _rows(report) if fig]
    return "\n".join(lines + _footer(report))


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
