"""`sagequant report --artifact DIR --html OUT`: an HTML page with what the compiler decided and
what it cost — accuracy (perplexity of the float source model vs the artifact on the same tokens),
memory, kernel choices — and three matplotlib plots:

  errors.png        per-layer output SQNR vs the float model (local and accumulated; error_report)
  activations.png   every quantized layer's observed input range next to the clip calibration chose
  weight_bytes.png  linear-weight bytes per layer kind, as compiled vs fp16

Accuracy and per-layer error need the float model (the artifact's recorded source or --reference);
without it those sections say so instead of showing numbers. Figures are drawn on
matplotlib.figure.Figure objects (no pyplot global state, no display needed).
"""
from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure


def weight_bytes_by_kind(cm) -> dict[str, dict[str, int]]:
    """{layer kind (last name part, e.g. q_proj): {"compiled": bytes, "fp16": bytes}}."""
    kinds: dict[str, dict[str, int]] = defaultdict(lambda: {"compiled": 0, "fp16": 0})
    for node in cm.graph.annotated():
        ann = cm.graph.annotation(node)
        kind = ann.layer.rsplit(".", 1)[-1]
        if ann.scheduler is not None:
            attrs = ann.kernel.attrs
            kinds[kind]["compiled"] += ann.scheduler.weight_bytes
            kinds[kind]["fp16"] += 2 * attrs["in_features"] * attrs["out_features"]
        elif getattr(node.args[1], "op", None) == "get_attr":
            n = cm.graph.attr(node.args[1]).numel()
            kinds[kind]["compiled"] += 2 * n  # kept layers deploy in fp16
            kinds[kind]["fp16"] += 2 * n
    return dict(kinds)


def _plot_errors(errors: list[dict], order: dict[str, int], path: Path) -> None:
    fig = Figure(figsize=(max(8, len(errors) * 0.12), 4.5), layout="constrained")
    ax = fig.add_subplot()
    rows = sorted(errors, key=lambda r: order[r["layer"]])
    x = range(len(rows))
    finite = lambda v: v if math.isfinite(v) else float("nan")  # noqa: E731
    ax.bar(x, [finite(r["local_sqnr_db"]) for r in rows], label="local (this layer alone)")
    ax.plot(x, [finite(r["accumulated_sqnr_db"]) for r in rows], "r.", label="accumulated (vs float model)")
    ax.set_ylabel("output SQNR (dB, higher is better)")
    ax.set_xlabel(f"{len(rows)} quantized layers, in model order")
    ax.set_title("Per-layer quantization error")
    ax.legend()
    fig.savefig(path, dpi=90)


def _plot_activations(records: dict[str, dict], path: Path) -> None:
    layers = list(records)  # model order
    fig = Figure(figsize=(max(8, len(layers) * 0.12), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = list(range(len(layers)))
    lo = [records[n]["min"] for n in layers]
    hi = [records[n]["max"] for n in layers]
    clip = [records[n]["clip"] for n in layers]
    ax.vlines(x, lo, hi, colors="tab:blue", label="observed input range [min, max]")
    ax.plot(x, clip, "r_", markersize=8, label="chosen clip (+)")
    ax.plot(x, [-c for c in clip], "r_", markersize=8, label="chosen clip (-)")
    ax.set_yscale("symlog")
    ax.set_xlabel(f"{len(layers)} quantized layers, in model order")
    ax.set_ylabel("activation value")
    ax.set_title("Activation ranges vs calibrated clip")
    ax.legend()
    fig.savefig(path, dpi=90)


def _plot_weight_bytes(by_kind: dict[str, dict[str, int]], path: Path) -> None:
    kinds = sorted(by_kind, key=lambda k: -by_kind[k]["fp16"])
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = range(len(kinds))
    ax.bar([i - 0.2 for i in x], [by_kind[k]["fp16"] / 2**20 for k in kinds], 0.4, label="fp16")
    ax.bar([i + 0.2 for i in x], [by_kind[k]["compiled"] / 2**20 for k in kinds], 0.4, label="as compiled")
    ax.set_xticks(list(x), kinds, rotation=30, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title("Linear-weight bytes by layer kind")
    ax.legend()
    fig.savefig(path, dpi=90)


def input_records(cm) -> dict[str, dict]:
    """The calibration record of each quantized layer's input, by layer name, in model order."""
    return {layer: recs["input"] for layer, recs in cm.calibration_records.items() if "input" in recs}


def write_html_report(cm, out_dir: str | Path, accuracy: dict | None, errors: list[dict] | None,
                      missing_reference: str | None = None) -> Path:
    """Write out_dir/report.html and its PNGs; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = cm.report()
    sections = [f"<h1>sagequant report: {html.escape(rep['scheme'])} on {html.escape(rep['backend'])}</h1>"]
    why_not = html.escape(missing_reference or "accuracy was not requested")
    if accuracy:
        sections.append("<h2>Accuracy</h2>" + _table(
            ["text", "tokens", "window", "float ppl", "quantized ppl", "Δ% ± se", "KL(float‖quant) ± se",
             "top-1 flips % ± se"],
            [[accuracy["text"], accuracy["tokens"], accuracy["window"], f"{accuracy['float_ppl']:.3f}",
              f"{accuracy['quantized_ppl']:.3f}", f"{accuracy['delta_pct']:+.2f} ± {accuracy['ppl_delta_pct_se']:.2f}",
              f"{accuracy['kl']:.4g} ± {accuracy['kl_se']:.2g}",
              f"{100 * accuracy['flip_rate']:.2f} ± {100 * accuracy['flip_rate_se']:.2f}"]]))
    else:
        sections.append(f"<h2>Accuracy</h2><p>Not measured: {why_not}.</p>")
    wb = rep["weight_bytes"]
    sections.append("<h2>Memory</h2>" + _table(
        ["quantized-layer bytes", "vs fp16", "bits/weight", "all linears vs fp16"],
        [[f"{wb['quantized_layers_bytes']:,}", f"{wb['quantized_layers_ratio_vs_fp16']:.3f}",
          f"{wb['bits_per_weight']:.2f}", f"{wb['all_linear_ratio_vs_fp16']:.3f}"]]))
    by_kind = weight_bytes_by_kind(cm)
    _plot_weight_bytes(by_kind, out / "weight_bytes.png")
    sections.append('<img src="weight_bytes.png" alt="weight bytes by layer kind">')
    sections.append("<h2>Kernels</h2>" + _table(["kernel", "layers"], list(rep["kernels"].items())))
    if rep["kept_in_high_precision"]:
        sections.append("<p>Kept in high precision: " + html.escape(
            ", ".join(f"{k} ({v})" for k, v in rep["kept_in_high_precision"].items())) + "</p>")
    sections.append("<h2>Per-layer error</h2>")
    if errors:
        order = {cm.graph.annotation(n).layer: i for i, n in enumerate(cm.graph.annotated())}
        _plot_errors(errors, order, out / "errors.png")
        sections.append('<img src="errors.png" alt="per-layer SQNR">' + _table(
            ["worst layers", "local SQNR dB", "accumulated SQNR dB"],
            [[r["layer"], f"{r['local_sqnr_db']:.2f}", f"{r['accumulated_sqnr_db']:.2f}"] for r in errors[:10]]))
    else:
        sections.append(f"<p>Not measured: {why_not}.</p>")
    sections.append("<h2>Activation ranges vs chosen clip</h2>")
    records = input_records(cm)
    if records:
        _plot_activations(records, out / "activations.png")
        sections.append('<img src="activations.png" alt="activation ranges vs clip">')
    else:
        sections.append("<p>No activation calibration records: this artifact was compiled without "
                        "observers on layer inputs (weight-only scheme or no calibration data).</p>")
    sections.append("<h2>Passes</h2>" + _table(
        ["pass", "seconds", "stats"],
        [[p["pass"], f"{p.get('seconds', 0):.2f}", json.dumps({k: v for k, v in p.items()
                                                               if k not in ("pass", "seconds")}, default=str)]
         for p in rep["passes"]]))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>sagequant report</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:"
            "collapse}td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}</style></head>"
            "<body>" + "\n".join(sections) + "</body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
