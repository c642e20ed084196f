"""Render an analysis (see :mod:`onnxqat.analysis`) as one self-contained HTML file.

Plots are drawn with matplotlib (Agg) and embedded as base64 PNGs; the page has no external
reference of any kind, so it can be mailed or archived as it is. A small inline script marks the
page once every image has decoded (``data-images="loaded N"`` on ``<body>``), which is what the
headless-browser test reads.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["render_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 3px 8px; border: 1px solid #ddd; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .note { color: #555; font-size: 0.9em; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', (ok === images.length ? 'loaded ' : 'broken ') + ok);
});
"""


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _sqnr_plot(rows: list[dict[str, Any]]) -> str:
    fig, ax = plt.subplots(figsize=(11, 3.6))
    x = range(len(rows))
    ax.plot(x, [r["local_sqnr_db"] for r in rows], "o-", ms=3, label="local (this quantizer alone)")
    ax.plot(x, [r["cumulative_sqnr_db"] for r in rows], "s-", ms=3, label="cumulative (sim vs float)")
    ax.set_xlabel("quantized tensor (graph order)")
    ax.set_ylabel("SQNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _sensitivity_plot(sens: Mapping[str, Any], metric: str) -> str:
    rows = sens["layers"]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    x = list(range(len(rows)))
    ax.bar([i - 0.2 for i in x], [r["only_this_quantized"] for r in rows], width=0.4, label="only this layer quantized")
    ax.bar([i + 0.2 for i in x], [r["all_but_this_quantized"] for r in rows], width=0.4, label="all but this layer")
    ax.axhline(sens["float"], color="g", ls="--", lw=1, label="float")
    ax.axhline(sens["quantized"], color="r", ls="--", lw=1, label="all quantized")
    values = [v for r in rows for v in (r["only_this_quantized"], r["all_but_this_quantized"])]
    values += [sens["float"], sens["quantized"]]
    lo, hi = min(values), max(values)
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.set_xticks(x)
    ax.set_xticklabels([r["node"][-28:] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    return _png(fig)


def _histogram_plot(hists: list[dict[str, Any]]) -> str:
    cols = 4
    rows = max(1, math.ceil(len(hists) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.1 * rows), squeeze=False)
    for ax, h in zip(axes.ravel(), hists):
        edges = [h["lo"] + i * h["width"] for i in range(len(h["counts"]) + 1)]
        ax.stairs([c if c > 0 else float("nan") for c in h["counts"]], edges, fill=True, alpha=0.6)
        ax.set_yscale("log")
        for v in h["encoding"]:
            ax.axvline(v, color="r", lw=1)
        ax.set_title(h["quantizer"][-36:], fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(hists):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f'<td class="num">{v:.4g}</td>'
        if isinstance(v, int):
            return f'<td class="num">{v}</td>'
        return f"<td>{html.escape(str(v))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(analysis: Mapping[str, Any], *, model_name: str, max_histograms: int = 24) -> str:
    settings = analysis["settings"]
    sens = analysis["sensitivity"]
    metric = settings["metric"]
    sqnr = analysis["quantizer_sqnr"]
    worst = sorted(analysis["histograms"], key=lambda h: _local_sqnr(sqnr, h["quantizer"]))[:max_histograms]
    ranked = sorted(sens["layers"], key=lambda r: -r["gain_if_float"])
    parts = [
        f"<h1>Quantization analysis: {html.escape(model_name)}</h1>",
        f"<p>W{settings['param_bw']}A{settings['activation_bw']}, {'per-channel' if settings['per_channel'] else 'per-tensor'} "
        f"weights, {html.escape(settings['scheme'])} calibration. {html.escape(analysis['plan']['summary'])}.</p>",
        _table(["", metric], [["float model", sens["float"]], ["all quantizers enabled", sens["quantized"]]]),
        "<h2>Layers that hurt most</h2>",
        "<p class='note'>Ranked by how much the metric recovers when only that layer stays float.</p>",
        _table(["rank", "node", "op", f"{metric}: only this quantized", f"{metric}: all but this", "gain if float"],
               [[i + 1, r["node"], r["op_type"], r["only_this_quantized"], r["all_but_this_quantized"], r["gain_if_float"]]
                for i, r in enumerate(ranked[:15])]),
        "<h2>Per-layer sensitivity</h2>",
        f'<img alt="per-layer sensitivity" src="{_sensitivity_plot(sens, metric)}">',
        "<h2>SQNR at every quantizer</h2>",
        "<p class='note'>Local: the encoding applied to the float model's tensor. Cumulative: the simulation "
        "against the float model at that tensor.</p>",
        f'<img alt="SQNR per quantizer" src="{_sqnr_plot(sqnr)}">',
        _table(["tensor", "bits", "local SQNR dB", "cumulative SQNR dB", "data min", "data max", "enc min", "enc max"],
               [[r["tensor"], r["bitwidth"], r["local_sqnr_db"], r["cumulative_sqnr_db"], *r["range"], *r["encoding"]]
                for r in sqnr]),
        f"<h2>Activation ranges ({len(worst)} lowest local SQNR)</h2>",
        "<p class='note'>Log-scale histograms of calibration data; red lines: the encoding range.</p>",
        f'<img alt="activation histograms" src="{_histogram_plot(worst)}">' if worst else "<p>none</p>",
        "<h2>Mixed precision</h2>",
        "<p>The config written beside this report (<code>mixed_precision.json</code>) keeps the most sensitive "
        "layers at 16 bits: " + ", ".join(f"<code>{html.escape(n)}</code>" for n in analysis["mixed_precision"]["nodes"])
        + ". Apply it with <code>--config</code>.</p>",
    ]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>onnxqat analysis: {html.escape(model_name)}</title><style>{_STYLE}</style>"
        f"<script>{_SCRIPT}</script></head><body>" + "\n".join(parts) + "</body></html>\n"
    )


def _local_sqnr(rows: list[dict[str, Any]], quantizer: str) -> float:
    return min((r["local_sqnr_db"] for r in rows if r["quantizer"] == quantizer), default=float("inf"))
