"""`sagequant report --artifact DIR --html OUT`: one self-contained HTML file (send it to a colleague
as is) with what the compiler decided and what it cost — accuracy (perplexity of the float source
model vs the artifact on the same tokens), memory, kernel choices, the accuracy guard, every pass's
time and statistics — and four plots drawn as inline SVG:

  per-layer error        output SQNR vs the float model (local and accumulated; error_report)
  activation ranges      every quantized layer's observed input range next to the calibrated clip
  weight bytes           linear-weight bytes per layer kind, as compiled vs fp16
  pass timings           seconds per pass

Nothing is linked: no image files, scripts or style sheets, and a Content-Security-Policy that
forbids loading any. Accuracy and per-layer error need the float model (the artifact's recorded
source or --reference); without it those sections say so instead of showing numbers. Figures are
drawn on matplotlib.figure.Figure objects (no pyplot global state, no display needed).
"""
from __future__ import annotations

import html
import io
import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from ..safe_write import output_file

GENERATOR = "<meta name='generator' content='sagequant'>"  # recognises our own earlier report
MAX_LIST_ITEMS = 12  # longer lists in pass statistics are cut, saying how many were left out
STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
         "vertical-align:top;text-align:left}table.kv td{border:none;padding:0 6px 0 0}"
         "figure{margin:1em 0}figure svg{max-width:100%;height:auto}figcaption{color:#555}")


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


def input_records(cm) -> dict[str, dict]:
    """The calibration record of each quantized layer's input, by layer name, in model order."""
    return {layer: recs["input"] for layer, recs in cm.calibration_records.items() if "input" in recs}


# ---- plots: each returns an inline <svg> element ---------------------------------------------
def _svg(fig: Figure, plot_id: str) -> str:
    """The figure as an <svg> element. matplotlib's element ids (figure_1, glyphs, clip paths) are
    unique per figure only: they get the plot's prefix, so figures on one page never share one."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    svg = text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: invalid inside HTML
    for before, after in (('id="', f'id="{plot_id}-'), ("url(#", f"url(#{plot_id}-"),
                          ('xlink:href="#', f'xlink:href="#{plot_id}-')):
        svg = svg.replace(before, after)
    return svg


def _wide_figure(n: int) -> Figure:
    return Figure(figsize=(max(8, n * 0.12), 4.5), layout="constrained")


def plot_errors(errors: list[dict], order: dict[str, int]) -> str:
    fig = _wide_figure(len(errors))
    ax = fig.add_subplot()
    rows = sorted(errors, key=lambda r: order[r["layer"]])
    x = range(len(rows))
    finite = lambda v: v if math.isfinite(v) else float("nan")  # noqa: E731
    ax.bar(x, [finite(r["local_sqnr_db"]) for r in rows], color="tab:blue", label="local (this layer alone)")
    ax.plot(x, [finite(r["accumulated_sqnr_db"]) for r in rows], "r.", label="accumulated (vs float model)")
    ax.set_ylabel("output SQNR (dB, higher is better)")
    ax.set_xlabel(f"{len(rows)} quantized layers, in model order")
    ax.set_title("Per-layer quantization error")
    ax.legend()
    return _svg(fig, "errors")


def plot_activations(records: dict[str, dict]) -> str:
    layers = list(records)  # model order
    fig = _wide_figure(len(layers))
    ax = fig.add_subplot()
    x = list(range(len(layers)))
    clip = [records[n]["clip"] for n in layers]
    ax.vlines(x, [records[n]["min"] for n in layers], [records[n]["max"] for n in layers],
              colors="tab:blue", linewidth=3, label="observed input range [min, max]")
    ax.plot(x, clip, "r_", markersize=8, label="chosen clip (+)")
    ax.plot(x, [-c for c in clip], "r_", markersize=8, label="chosen clip (-)")
    ax.set_yscale("symlog")
    ax.set_xlabel(f"{len(layers)} quantized layers, in model order")
    ax.set_ylabel("activation value")
    ax.set_title("Activation ranges vs calibrated clip")
    ax.legend()
    return _svg(fig, "activations")


def plot_weight_bytes(by_kind: dict[str, dict[str, int]]) -> str:
    kinds = sorted(by_kind, key=lambda k: -by_kind[k]["fp16"])
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = range(len(kinds))
    ax.bar([i - 0.2 for i in x], [by_kind[k]["fp16"] / 2**20 for k in kinds], 0.4, color="tab:blue",
           label="fp16")
    ax.bar([i + 0.2 for i in x], [by_kind[k]["compiled"] / 2**20 for k in kinds], 0.4, color="tab:orange",
           label="as compiled")
    ax.set_xticks(list(x), kinds, rotation=30, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title("Linear-weight bytes by layer kind")
    ax.legend()
    return _svg(fig, "weight-bytes")


def plot_pass_seconds(passes: list[dict]) -> str:
    timed = [p for p in passes if "seconds" in p]
    fig = Figure(figsize=(8, 0.6 + 0.3 * len(timed)), layout="constrained")
    ax = fig.add_subplot()
    y = range(len(timed))
    ax.barh(list(y), [p["seconds"] for p in timed], color="tab:blue")
    ax.set_yticks(list(y), [p["pass"] for p in timed])
    ax.invert_yaxis()  # pipeline order top to bottom
    ax.set_xlabel("seconds")
    ax.set_title(f"Pass timings ({sum(p['seconds'] for p in timed):.2f} s in all)")
    return _svg(fig, "pass-seconds")


# ---- tables ----------------------------------------------------------------------------------
def _text(value) -> str:
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    return html.escape(str(value))


def _value(value) -> str:
    """A statistic as HTML: dicts as key/value tables, lists of records as tables, other lists as
    comma lists; long lists are cut, saying how many items were left out."""
    if isinstance(value, dict):
        if not value:
            return "—"
        return "<table class='kv'>" + "".join(f"<tr><td>{_text(k)}</td><td>{_value(v)}</td></tr>"
                                              for k, v in value.items()) + "</table>"
    if isinstance(value, (list, tuple)):
        if not value:
            return "—"
        more = f" … ({len(value) - MAX_LIST_ITEMS} more)" if len(value) > MAX_LIST_ITEMS else ""
        items = value[:MAX_LIST_ITEMS]
        if all(isinstance(v, dict) for v in items):
            keys = list(dict.fromkeys(k for v in items for k in v))
            return _table(keys, [[_value(v.get(k, "")) for k in keys] for v in items],
                          raw_columns=tuple(range(len(keys)))) + more
        return ", ".join(_value(v) for v in items) + more
    return _text(value)


def _table(header: list[str], rows: list[list], raw_columns: tuple[int, ...] = ()) -> str:
    """Cells are escaped text, except columns in raw_columns, already HTML from _value."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if i in raw_columns else _text(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>"


# ---- the page --------------------------------------------------------------------------------
def _sections(cm, accuracy: dict | None, errors: list[dict] | None, why_not: str) -> list[str]:
    rep = cm.report()
    model = rep["model"]
    out = [f"<h1>sagequant report: {_text(rep['scheme'])} on {_text(rep['backend'])}</h1>",
           _table(["model", "source", "quantized linears", "priority"],
                  [[model.get("architecture", "?"), model.get("source", "not recorded"),
                    f"{rep['quantized_layers']} / {rep['linear_layers']}", rep["priority"]]])]
    out.append("<h2>Accuracy</h2>")
    if accuracy:
        out.append(_table(["text", "tokens", "window", "float ppl", "quantized ppl", "Δ% ± se",
                           "KL(float‖quant) ± se", "top-1 flips % ± se"],
                          [[accuracy["text"], accuracy["tokens"], accuracy["window"],
                            f"{accuracy['float_ppl']:.3f}", f"{accuracy['quantized_ppl']:.3f}",
                            f"{accuracy['delta_pct']:+.2f} ± {accuracy['ppl_delta_pct_se']:.2f}",
                            f"{accuracy['kl']:.4g} ± {accuracy['kl_se']:.2g}",
                            f"{100 * accuracy['flip_rate']:.2f} ± {100 * accuracy['flip_rate_se']:.2f}"]]))
    else:
        out.append(f"<p>Not measured: {html.escape(why_not)}.</p>")
    guard = rep.get("accuracy_guard")
    if guard:
        out.append("<h3>Accuracy guard (held-back calibration data)</h3>" + _value(guard))
    wb = rep["weight_bytes"]
    out.append("<h2>Memory</h2>" + _table(
        ["quantized-layer bytes", "vs fp16", "bits/weight", "all linears vs fp16"],
        [[f"{wb['quantized_layers_bytes']:,}", f"{wb['quantized_layers_ratio_vs_fp16']:.3f}",
          f"{wb['bits_per_weight']:.2f}", f"{wb['all_linear_ratio_vs_fp16']:.3f}"]]))
    out.append(_figure(plot_weight_bytes(weight_bytes_by_kind(cm)), "Linear-weight bytes per layer kind."))
    out.append("<h2>Kernels</h2>" + _table(["kernel", "layers"], list(rep["kernels"].items())))
    if rep["kept_in_high_precision"]:
        out.append("<h3>Kept in high precision</h3>" + _table(
            ["layer", "why"], list(rep["kept_in_high_precision"].items())))
    out.append("<h2>Per-layer error</h2>")
    if errors:
        order = {cm.graph.annotation(n).layer: i for i, n in enumerate(cm.graph.annotated())}
        out.append(_figure(plot_errors(errors, order), "Output SQNR of every quantized layer."))
        out.append(_table(["worst layers", "local SQNR dB", "accumulated SQNR dB"],
                          [[r["layer"], f"{r['local_sqnr_db']:.2f}", f"{r['accumulated_sqnr_db']:.2f}"]
                           for r in errors[:10]]))
    else:
        out.append(f"<p>Not measured: {html.escape(why_not)}.</p>")
    out.append("<h2>Activation ranges vs chosen clip</h2>")
    records = input_records(cm)
    if records:
        out.append(_figure(plot_activations(records), "Observed input range and calibrated clip per layer."))
    else:
        out.append("<p>No activation calibration records: this artifact was compiled without "
                   "observers on layer inputs (weight-only scheme or no calibration data).</p>")
    out.append("<h2>Passes</h2>")
    if any("seconds" in p for p in rep["passes"]):
        out.append(_figure(plot_pass_seconds(rep["passes"]), "Time per pass."))
    out.append(_table(["pass", "seconds", "changed the graph", "statistics"],
                      [[p["pass"], f"{p['seconds']:.2f}" if "seconds" in p else "—",
                        "yes" if p.get("modified") else "no", _value(p.get("stats", {}))]
                       for p in rep["passes"]], raw_columns=(3,)))
    return out


def render_html_report(cm, accuracy: dict | None, errors: list[dict] | None,
                       missing_reference: str | None = None) -> str:
    """The page as one string."""
    why_not = missing_reference or "accuracy was not requested"
    return ("<!doctype html><html><head><meta charset='utf-8'>" + GENERATOR +
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
            "style-src 'unsafe-inline'\"><title>sagequant report</title>"
            f"<style>{STYLE}</style></head><body>" + "\n".join(_sections(cm, accuracy, errors, why_not))
            + "</body></html>")


def report_path(out: str | Path) -> Path:
    """`out` itself when it names a .html file, else out/report.html."""
    out = Path(out)
    return out if out.suffix.lower() in (".html", ".htm") else out / "report.html"


def is_sagequant_report(path: Path) -> bool:
    with open(path, "rb") as f:
        return GENERATOR.encode() in f.read(512)


def write_html_report(cm, out: str | Path, accuracy: dict | None, errors: list[dict] | None,
                      missing_reference: str | None = None, overwrite: bool = False) -> Path:
    """Write the page to `out` (a .html path, or a directory that gets report.html); returns it.
    Atomic (a reader never sees half a page); an existing file there is replaced only when it is
    an earlier sagequant report or overwrite=True."""
    path = report_path(out)
    page = render_html_report(cm, accuracy, errors, missing_reference)
    with output_file(path, overwrite, what="HTML report", ours=is_sagequant_report) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
