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
    ax.plot(x, [float("nan") if r["cumulative_sqnr_db"] is None else r["cumulative_sqnr_db"] for r in rows], "s-", ms=3,
            label="cumulative (sim vs float)")
    ax.set_xlabel("quantized tensor (graph order)")
    ax.set_ylabel("SQNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _sensitivity_plot(sens: Mapping[str, Any], metric: str, top: int = 30) -> str:
    """Horizontal bars, worst first: the ``top`` worst layers by name, then one bar for the rest
    (its worst value), so the chart stays readable for any number of layers."""
    ranked = sorted(sens["layers"], key=lambda r: r["only_this_quantized"])
    shown, rest = ranked[:top], ranked[top:]
    labels = [f"{r['name'][-48:]} ({r['op_type']})" for r in shown]
    values = [r["only_this_quantized"] for r in shown]
    if rest:
        labels.append(f"the other {len(rest)} layers (best of them shown)")
        values.append(max(r["only_this_quantized"] for r in rest))
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(labels) + 1.4))
    y = list(range(len(labels)))
    colors = ["#c0504d"] * len(shown) + (["#999999"] if rest else [])
    ax.barh(y, values, color=colors)
    ax.axvline(sens["float"], color="g", ls="--", lw=1, label="float")
    ax.axvline(sens["quantized"], color="r", ls="--", lw=1, label="all quantized")
    lo = min([*values, sens["quantized"]])
    hi = max([*values, sens["float"]])
    ax.set_xlim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} with only this layer quantized")
    ax.legend(fontsize=8, loc="lower right")
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


def _outputs_table(sens: Mapping[str, Any]) -> str:
    rows = []
    for name, q in sens["quantized_outputs"].items():
        rows.append([name, q["sqnr_db"], q["channel_sqnr_db"], "n/a" if q["top1_agreement"] is None else q["top1_agreement"]])
    return _table(["output", "SQNR dB (all quantized)", "mean channel SQNR dB", "top-1 agreement with float"], rows)


def _suggestions_table(sugg: Mapping[str, Any]) -> str:
    rows = []
    for r in sugg["rows"]:
        if "error" in r:
            rows.append([r["suggestion"], "not possible: " + r["error"], "", "", ""])
            continue
        rows.append([r["suggestion"], r["metric"], r["change"], r.get("deployed_ms", "not timed"),
                     r.get("speedup_vs_float", "")])
    note = ""
    if "float_ms" in sugg:
        note = (f"<p class='note'>Deployed speed: plain onnxruntime {html.escape(str(sugg['onnxruntime']))}, batch "
                f"{sugg['batch_size']}, median of 20 runs interleaved; float model {sugg['float_ms']:.2f} ms.</p>")
    elif "timing_error" in sugg:
        note = f"<p class='note'>Not timed: {html.escape(sugg['timing_error'])}</p>"
    return _table(["suggestion", sugg["metric"], "change", "deployed ms/batch", "speed-up vs float"], rows) + note


def render_html(analysis: Mapping[str, Any], *, model_name: str, max_histograms: int = 24) -> str:
    settings = analysis["settings"]
    sens = analysis["sensitivity"]
    metric = settings["metric"]
    sqnr = analysis["quantizer_sqnr"]
    worst = sorted(analysis["histograms"], key=lambda h: _local_sqnr(sqnr, h["quantizer"]))[:max_histograms]
    ranked = sorted(sens["layers"], key=lambda r: r["only_this_quantized"])
    scanned = (f"{sens['scored']} of {sens['total_layers']} layers scored"
               + (" (stopped early: the rest did not enter the worst ones)" if sens["early_stopped"] else "")
               + f", {sens['runs']} runs of one switchable session, {sens['seconds']:.1f} s.")
    parts = [
        f"<h1>Quantization analysis: {html.escape(model_name)}</h1>",
        f"<p>W{settings['param_bw']}A{settings['activation_bw']}, {'per-channel' if settings['per_channel'] else 'per-tensor'} "
        f"weights, {html.escape(settings['scheme'])} calibration, {settings['samples']} samples. "
        f"{html.escape(analysis['plan']['summary'])}.</p>",
        _table(["", metric], [["float model", sens["float"]], ["all quantizers enabled", sens["quantized"]],
                              ["all quantizers, onnxruntime's fused kernels", sens["quantized_fused_kernels"]]]),
        "<h2>Outputs</h2>",
        _outputs_table(sens),
        "<h2>Layers that hurt most</h2>",
        f"<p class='note'>Ranked by the metric with only that layer quantized (lower is worse); named by tensor, "
        f"as in the SQNR table. The worst are also scored with every quantizer but theirs. {html.escape(scanned)}</p>",
        _table(["rank", "tensor", "node", "op", f"{metric}: only this quantized", "drop vs float",
                f"{metric}: all but this", "gain if float", "local SQNR dB"],
               [[i + 1, r["name"], r["node"], r["op_type"], r["only_this_quantized"], r["drop_if_quantized_alone"],
                 "" if r["all_but_this_quantized"] is None else r["all_but_this_quantized"],
                 "" if r["gain_if_float"] is None else r["gain_if_float"],
                 "" if r["local_sqnr_db"] is None else r["local_sqnr_db"]]
                for i, r in enumerate(ranked[:15])]),
        "<h2>Per-layer sensitivity</h2>",
        f'<img alt="per-layer sensitivity" src="{_sensitivity_plot(sens, metric)}">',
    ]
    if "suggestions" in analysis:
        parts += ["<h2>Suggestions, measured</h2>",
                  "<p class='note'>Each variant built, calibrated on the same data and scored with its own "
                  "simulation (fused kernels).</p>", _suggestions_table(analysis["suggestions"])]
    parts += [
        "<h2>SQNR at every quantizer</h2>",
        "<p class='note'>Local: the encoding applied to the float model's tensor. Cumulative: the simulation "
        "against the float model at that tensor.</p>",
        f'<img alt="SQNR per quantizer" src="{_sqnr_plot(sqnr)}">',
        _table(["tensor", "bits", "local SQNR dB", "cumulative SQNR dB", "data min", "data max", "enc min", "enc max"],
               [[r["tensor"], r["bitwidth"], r["local_sqnr_db"],
                 "" if r["cumulative_sqnr_db"] is None else r["cumulative_sqnr_db"], *r["range"], *r["encoding"]]
                for r in sqnr]),
        f"<h2>Activation ranges ({len(worst)} lowest local SQNR)</h2>",
        "<p class='note'>Log-scale histograms of calibration data; red lines: the encoding range.</p>",
        f'<img alt="activation histograms" src="{_histogram_plot(worst)}">' if worst else "<p>none</p>",
        "<h2>Mixed precision</h2>",
        "<p>The config written beside this report (<code>mixed_precision.json</code>) keeps the most sensitive "
        "layers at 16 bits: " + ", ".join(f"<code>{html.escape(n)}</code>" for n in analysis["mixed_precision"]["nodes"])
        + ". Apply it with <code>--config</code>; for the cheapest assignment that meets a target, run "
          "<code>onnxqat quantize ... --target-accuracy-drop X --eval EVAL.npz</code> or <code>--target-sqnr DB</code>.</p>",
    ]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>onnxqat analysis: {html.escape(model_name)}</title><style>{_STYLE}</style>"
        f"<script>{_SCRIPT}</script></head><body>" + "\n".join(parts) + "</body></html>\n"
    )


def _local_sqnr(rows: list[dict[str, Any]], quantizer: str) -> float:
    return min((r["local_sqnr_db"] for r in rows if r["quantizer"] == quantizer), default=float("inf"))
