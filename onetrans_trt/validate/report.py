"""Validation reports: JSON (stable keys) and one self-contained HTML page.

JSON keys: ``format``, ``build``, ``created``, ``checkpoint``, ``policy``, ``requests``
(``source``, ``count``, ``labelled``), ``verdict`` (``pass``/``fail``), ``backends.<name>``
(``precision``, ``verdict``, ``tolerance``, ``graphs.user_encoder.<user_k_l|user_v_l>``
and ``graphs.candidate_scorer.logits`` with ``max_abs``, ``mean_abs``, ``max_rel``,
``p99_abs``, ``cosine``, ``nan``, ``inf``, ``shape_mismatch``, ``pass``; ``end_to_end``
with ``logits``, ``ranking`` and per-task ``metrics``; ``divergence`` with ``layer``,
``module``, ``node``, ``tensor``, ``role``, ``max_abs``; ``note``), ``plots``.

Added (``onetrans-trt/validate/1`` still: nothing above renamed): ``backends.<name>.checks``,
the checks behind the backend's verdict, each ``{name, value, limit, passed, reason}``
(``passed`` null: not judged, the reason says why; ``delta_auc`` checks add ``task``,
``pairs`` and ``min_pairs``, ``max_error``/``cosine`` add ``output``; see
:mod:`onetrans_trt.validate.checks`), and ``skipped``: backends not run, each with the reason
(TensorRT or a GPU missing, a variant not built). ``provenance``: ``versions`` of every tool
(:mod:`onetrans_trt.provenance`), the ``command`` line, the ``host`` (CPU, cores, GPUs) and
the sha256 of the build's ``graphs`` the report is about.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from onetrans_trt.io import atomic_write_text


def write_json(report: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(path, json.dumps(report, indent=2, default=float) + "\n")


#: what to try when a check fails, shown under the failing row of the report
WHAT_TO_DO = {
    "max_error": "the first divergence below names the layer and node; keep that op in FP32 "
                 "(convert --keep-fp32 / calibrate --keep-float) or re-export if it is an FP32 backend",
    "cosine": "the outputs point elsewhere, not only noisier: look at the first divergence; a wrong graph, "
              "not precision, is the usual cause",
    "nan_inf": "an overflow: the first divergence names the op; keep it in FP32 (--keep-fp32) or pass the "
               "K/V in FP32 (convert without --kv-fp16)",
    "shape": "the backend returns another shape: re-export the build and re-run convert/calibrate",
    "delta_auc": "the ranking quality moved: validate on more labelled requests (--count) before acting; keep the "
                 "layers named by the first divergence in higher precision",
    "top10_overlap": "the top of the ranking changed: keep the scorer's attention and head in higher precision",
    "kendall_tau": "the order changed across the list: keep the scorer's attention and head in higher precision",
    "error": "the backend could not run: the message says why (a missing variant or engine: build it)",
}


def _fmt(x: float, spec: str) -> str:
    """``format(x, spec)`` without a negative zero ("-0.000000" reads as a sign that is not there)."""
    out = format(x, spec)
    try:
        if float(out) == 0:
            return format(0.0, spec.replace("+", ""))
    except ValueError:
        pass
    return out


def _svg(fig) -> str:
    """A matplotlib figure as an inline <svg> element (text kept as text, stable ids)."""
    import io

    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "onetrans-trt"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    return text[text.index("<svg"):].strip()


def _figure(width: float = 4.8, height: float = 3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=72, layout="constrained")
    return fig, fig.add_subplot()


def _svg_histogram(hist: dict, limit: float | None = None, name: str = "backend") -> str:
    """Bars: how many scorer logits have each |error| (log10 bins); the dashed line: the limit
    the max-error check applies (atol + rtol x max |PyTorch logit|)."""
    counts, edges = hist["counts"], hist["log10_edges"]
    fig, ax = _figure()
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    bars = ax.bar(edges[:-1], counts, width=widths, align="edge", color="#4a7bd0", edgecolor="white", linewidth=0.4)
    for i, bar in enumerate(bars):
        bar.set_gid(f"bar-{i}")
    if limit:
        import math

        line = ax.axvline(math.log10(limit), color="#cf222e", linestyle="--", linewidth=1.2,
                          label=f"tolerance {limit:.3g}")
        line.set_gid("tolerance")
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.set_xlim(edges[0], edges[-1])
    ax.xaxis.set_major_formatter(lambda v, _pos: f"1e{v:.0f}")
    ax.set_xlabel(f"|{name} logit - PyTorch logit| (log scale)", fontsize=9)
    ax.set_ylabel("scorer logits", fontsize=9)
    ax.tick_params(labelsize=8)
    return _svg(fig)


def _svg_scatter(ref: list[float], got: list[float], limit: float | None = None, name: str = "backend") -> str:
    """Points: each scorer logit's error against its PyTorch value; the dashed lines: +-limit,
    the band the max-error check allows."""
    if not ref:
        return "<p>(no points)</p>"
    fig, ax = _figure()
    err = [g - r for r, g in zip(ref, got)]
    pts = ax.scatter(ref, err, s=7, color="#c0392b", alpha=0.55, linewidths=0)
    pts.set_gid("points")
    zero = ax.axhline(0.0, color="#888", linewidth=0.8)
    zero.set_gid("zero")
    if limit:
        up = ax.axhline(limit, color="#cf222e", linestyle="--", linewidth=1.1, label=f"tolerance +-{limit:.3g}")
        down = ax.axhline(-limit, color="#cf222e", linestyle="--", linewidth=1.1)
        up.set_gid("tolerance-upper")
        down.set_gid("tolerance-lower")
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_xlabel("PyTorch logit (fp32 reference)", fontsize=9)
    ax.set_ylabel(f"{name} - PyTorch (logit)", fontsize=9)
    ax.tick_params(labelsize=8)
    return _svg(fig)


def logit_limit(backend: dict[str, Any]) -> float | None:
    """The max-error limit on the scorer logits: atol + rtol x max |PyTorch logit|."""
    tol = backend.get("tolerance") or {}
    s = (backend.get("graphs") or {}).get("candidate_scorer", {}).get("logits") or {}
    if "atol" not in tol:
        return None
    return tol["atol"] + tol.get("rtol", 0.0) * float(s.get("ref_max_abs", 0.0))


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
    prov = report.get("provenance")
    if prov:
        vers = ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())
        host = prov.get("host", {})
        graphs = "".join(f"<li><code>{e(k)}</code> sha256 <code>{e(v)}</code></li>"
                         for k, v in prov.get("graphs", {}).items())
        parts.append(f"<details id='provenance' open><summary>Provenance</summary>"
                     f"<p>Command <code>{e(prov.get('command', ''))}</code> on {e(str(host.get('cpu', '')))} "
                     f"({host.get('cores', '?')} cores{', GPUs ' + e(', '.join(host['gpus'])) if host.get('gpus') else ''})"
                     f"</p><p>Versions: {e(vers)}</p><ul>{graphs}</ul></details>")
    for name, b in report["backends"].items():
        cls = "pass" if b["verdict"] == "pass" else "fail"
        parts.append(f"<h2>{e(name)} <span class='{cls}'>{b['verdict'].upper()}</span> "
                     f"<small>({e(b['precision'])}; atol {b['tolerance']['atol']}, rtol {b['tolerance']['rtol']})</small></h2>")
        parts.append("<table><tr><th>graph</th><th>output</th><th>max abs</th><th>mean abs</th><th>p99 abs</th>"
                     "<th>max rel</th><th>cosine</th><th>NaN/Inf</th><th>ok</th></tr>")
        for g, outs in b["graphs"].items():
            for o, s in outs.items():
                parts.append(f"<tr><td>{g}</td><td>{e(o)}</td><td>{s['max_abs']:.3g}</td><td>{s['mean_abs']:.3g}</td>"
                             f"<td>{s['p99_abs']:.3g}</td><td>{s['max_rel']:.3g}</td><td>{_fmt(s['cosine'], '.6f')}</td>"
                             f"<td>{s['nan']}/{s['inf']}</td><td class='{'pass' if s['pass'] else 'fail'}'>"
                             f"{'yes' if s['pass'] else 'NO' + (' (' + e(s['shape_mismatch']) + ')' if s['shape_mismatch'] else '')}</td></tr>")
        parts.append("</table>")
        end = b.get("end_to_end", {})
        if "metrics" in end:
            parts.append("<table><tr><th>task</th><th>AUC</th><th>PyTorch AUC</th><th>delta</th><th>delta logloss</th></tr>")
            for t, m in end["metrics"].items():
                parts.append(f"<tr><td>{e(t)}</td><td>{m['auc']:.5f}</td><td>{m['torch_auc']:.5f}</td>"
                             f"<td>{_fmt(m['delta_auc'], '+.6f')}</td><td>{_fmt(m['delta_logloss'], '+.6f')}</td></tr>")
            parts.append("</table>")
        if "ranking" in end:
            r = end["ranking"]
            parts.append(f"<p>Ranking vs PyTorch: top-10 overlap {r.get('top10_overlap_mean', 0):.3f}, "
                         f"Kendall tau {r.get('kendall_tau_mean', float('nan')):.3f}</p>")
        if b.get("checks"):
            mark = {True: ("pass", "ok"), False: ("fail", "FAILED"), None: ("", "not judged")}
            parts.append("<ul class='checks'>" + "".join(
                f"<li class='{mark[c['passed']][0]}'>{mark[c['passed']][1]}: {e(c['reason'])}"
                + (f"<div class='todo'>What to do: {e(WHAT_TO_DO[c['name']])}</div>"
                   if c["passed"] is False and c["name"] in WHAT_TO_DO else "") + "</li>"
                for c in b["checks"]) + "</ul>")
        if b.get("divergence"):
            d = b["divergence"]
            parts.append(f"<p class='fail' id='divergence-{e(name)}'>First divergence: "
                         f"{e(json.dumps(d, default=str))}</p>")
        if b.get("note"):
            parts.append(f"<p><i>{e(b['note'])}</i></p>")
        plot = report.get("plots", {}).get(name)
        if plot:
            limit = logit_limit(b)
            parts.append("<div style='display:flex;gap:24px;flex-wrap:wrap'><div><b>|error| of the scorer logits</b><br>"
                         f"{_svg_histogram(plot['histogram'], limit, name)}</div>"
                         f"<div><b>{e(name)} error vs the PyTorch logit</b><br>"
                         f"{_svg_scatter(*plot['scatter'], limit, name)}</div></div>")
    for name, why in report.get("skipped", {}).items():
        parts.append(f"<p class='skipped'>Skipped {e(name)}: {e(why)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(path, render_html(report))
