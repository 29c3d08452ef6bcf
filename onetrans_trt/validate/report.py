"""Validation reports: JSON (stable keys) and one self-contained HTML page.

JSON keys: ``format``, ``build``, ``created``, ``checkpoint``, ``policy``, ``requests``
(``source``, ``count``, ``labelled``), ``verdict`` (``pass``/``fail``), ``backends.<name>``
(``precision``, ``verdict``, ``tolerance``, ``graphs.user_encoder.<user_k_l|user_v_l>``
and ``graphs.candidate_scorer.logits`` with ``max_abs``, ``mean_abs``, ``max_rel``,
``p99_abs``, ``cosine``, ``nan``, ``inf``, ``shape_mismatch``, ``pass``; ``end_to_end``
with ``logits``, ``ranking`` and per-task ``metrics``; ``divergence`` with ``layer``,
``module``, ``node``, ``tensor``, ``role``, ``max_abs``; ``note``), ``plots``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from onetrans_trt.io import atomic_write_text


def write_json(report: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(path, json.dumps(report, indent=2, default=float) + "\n")


def _svg_histogram(hist: dict, width: int = 360, height: int = 140) -> str:
    counts = hist["counts"]
    edges = hist["log10_edges"]
    top = max(counts) or 1
    bw = width / len(counts)
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - 20 - (c / top) * (height - 30):.1f}" width="{bw - 1:.1f}" '
        f'height="{(c / top) * (height - 30):.1f}" fill="#4a7bd0"/>' for i, c in enumerate(counts))
    labels = "".join(f'<text x="{i * bw:.0f}" y="{height - 5}" font-size="9">1e{edges[i]:.0f}</text>'
                     for i in range(0, len(counts), 5))
    return f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{bars}{labels}</svg>'


def _svg_scatter(ref: list[float], got: list[float], size: int = 220) -> str:
    if not ref:
        return "<p>(no points)</p>"
    lo, hi = min(ref + got), max(ref + got)
    span = (hi - lo) or 1.0
    sx = lambda v: 10 + (v - lo) / span * (size - 20)  # noqa: E731
    sy = lambda v: size - 10 - (v - lo) / span * (size - 20)  # noqa: E731
    pts = "".join(f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="1.5" fill="#c0392b" fill-opacity="0.5"/>'
                  for a, b in zip(ref, got))
    diag = f'<line x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi):.1f}" stroke="#888"/>'
    return f'<svg width="{size}" height="{size}" xmlns="http://www.w3.org/2000/svg">{diag}{pts}</svg>'


def render_html(report: dict[str, Any]) -> str:
    e = html.escape
    ok = report["verdict"] == "pass"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>onetrans-trt validation</title>",
        "<style>body{font-family:sans-serif;margin:24px} table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px} .pass{color:#1a7f37} .fail{color:#cf222e}"
        ".banner{font-size:28px;font-weight:bold;padding:12px;border-radius:6px}</style></head><body>",
        f"<div id='verdict' class='banner {'pass' if ok else 'fail'}'>Verdict: {'PASS' if ok else 'FAIL'}</div>",
        f"<p>Build <code>{e(report['build'])}</code>; {report['requests']['count']} requests from "
        f"{e(str(report['requests']['source']))}; created {e(str(report.get('created', '')))}</p>",
    ]
    for name, b in report["backends"].items():
        cls = "pass" if b["verdict"] == "pass" else "fail"
        parts.append(f"<h2>{e(name)} <span class='{cls}'>{b['verdict'].upper()}</span> "
                     f"<small>({e(b['precision'])}; atol {b['tolerance']['atol']}, rtol {b['tolerance']['rtol']})</small></h2>")
        parts.append("<table><tr><th>graph</th><th>output</th><th>max abs</th><th>mean abs</th><th>p99 abs</th>"
                     "<th>max rel</th><th>cosine</th><th>NaN/Inf</th><th>ok</th></tr>")
        for g, outs in b["graphs"].items():
            for o, s in outs.items():
                parts.append(f"<tr><td>{g}</td><td>{e(o)}</td><td>{s['max_abs']:.3g}</td><td>{s['mean_abs']:.3g}</td>"
                             f"<td>{s['p99_abs']:.3g}</td><td>{s['max_rel']:.3g}</td><td>{s['cosine']:.6f}</td>"
                             f"<td>{s['nan']}/{s['inf']}</td><td class='{'pass' if s['pass'] else 'fail'}'>"
                             f"{'yes' if s['pass'] else 'NO' + (' (' + e(s['shape_mismatch']) + ')' if s['shape_mismatch'] else '')}</td></tr>")
        parts.append("</table>")
        end = b.get("end_to_end", {})
        if "metrics" in end:
            parts.append("<table><tr><th>task</th><th>AUC</th><th>PyTorch AUC</th><th>delta</th><th>delta logloss</th></tr>")
            for t, m in end["metrics"].items():
                parts.append(f"<tr><td>{e(t)}</td><td>{m['auc']:.5f}</td><td>{m['torch_auc']:.5f}</td>"
                             f"<td>{m['delta_auc']:+.6f}</td><td>{m['delta_logloss']:+.6f}</td></tr>")
            parts.append("</table>")
        if "ranking" in end:
            r = end["ranking"]
            parts.append(f"<p>Ranking vs PyTorch: top-10 overlap {r.get('top10_overlap_mean', 0):.3f}, "
                         f"Kendall tau {r.get('kendall_tau_mean', float('nan')):.3f}</p>")
        if b.get("divergence"):
            d = b["divergence"]
            parts.append(f"<p class='fail' id='divergence-{e(name)}'>First divergence: "
                         f"{e(json.dumps(d, default=str))}</p>")
        if b.get("note"):
            parts.append(f"<p><i>{e(b['note'])}</i></p>")
        plot = report.get("plots", {}).get(name)
        if plot:
            parts.append("<div style='display:flex;gap:24px'><div><b>|error| of scorer logits (log10)</b><br>"
                         f"{_svg_histogram(plot['histogram'])}</div><div><b>{e(name)} vs PyTorch logits</b><br>"
                         f"{_svg_scatter(*plot['scatter'])}</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(path, render_html(report))
