"""The text ``validate`` prints: the verdict, one line per backend, each failed check with its
value and limit, the checks that were not judged and why (once for the backends they share),
the backends skipped with their reason, and the reports actually written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onetrans_trt.validate.checks import failed

MAX_REASONS = 3  # per backend in the one-line failure message


def _skipped_lines(skipped: dict[str, str]) -> list[str]:
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    return [f"  skipped {', '.join(names)}: {reason}" for reason, names in by_reason.items()]


def _not_judged_lines(backends: dict[str, Any]) -> list[str]:
    by_reason: dict[str, list[str]] = {}
    for name, b in backends.items():
        for c in b.get("checks", []):
            if c["passed"] is None and c["limit"] is not None:
                by_reason.setdefault(c["reason"], []).append(name)
    return [f"  {', '.join(names)}: {reason}" for reason, names in by_reason.items()]


def summary_lines(report: dict[str, Any], written: list[str | Path | None] = ()) -> list[str]:
    """``written``: the report files this run wrote (``None`` entries are ignored); only these
    are named."""
    lines = [f"verdict: {report['verdict'].upper()} ({report['requests']['count']} requests; data: "
             f"{report['requests']['source']})"]
    for name, b in report["backends"].items():
        worst = max((s["max_abs"] for g in b["graphs"].values() for s in g.values()), default=0.0)
        line = f"  {name:12s} {b['verdict'].upper():4s}  max |error| {worst:.3g}"
        m = b.get("end_to_end", {}).get("metrics")
        if m:
            line += "  delta AUC " + ", ".join(f"{t} {v['delta_auc']:+.5f}" for t, v in m.items())
        lines.append(line)
        lines += [f"    failed: {c['reason']}" for c in failed(b.get("checks", []))]
        d = b.get("divergence")
        if d and d.get("module"):
            lines.append(f"    first divergence: layer {d['layer']}, {d['module']} (node {d['node']}, "
                         f"{d['role']}), max |error| {d['max_abs']:.3g}"
                         + (f", shape {d['shape_mismatch']}" if d.get("shape_mismatch") else ""))
        elif d and d.get("note"):
            lines.append(f"    first divergence: not searched ({d['note']})")
        elif b["verdict"] == "fail" and "goldens" not in report and not b.get("error"):
            lines.append("    first divergence: none found (no graph tensor out of tolerance in the request searched)")
    lines += _not_judged_lines(report["backends"])
    lines += _skipped_lines(report.get("skipped", {}))
    lines += [f"report: {p}" for p in written if p]
    return lines


def failure_message(report: dict[str, Any]) -> str:
    """One line for a failed verdict: each failing backend with its failed checks."""
    parts = []
    for name, b in report["backends"].items():
        if b["verdict"] == "pass":
            continue
        reasons = [c["reason"] for c in failed(b.get("checks", []))]
        more = f" (and {len(reasons) - MAX_REASONS} more)" if len(reasons) > MAX_REASONS else ""
        parts.append(f"{name}: {'; '.join(reasons[:MAX_REASONS]) or 'failed'}{more}")
    return "validation failed: " + " | ".join(parts)
