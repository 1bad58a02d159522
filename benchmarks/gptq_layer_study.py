"""Per-layer GPTQ study on SmolLM2-135M (issue 19): why GPTQ's lower calibration error does not
give a lower perplexity than round-to-nearest.

One pass of the float model collects, for every linear input of every decoder block, the
calibration Hessian (Wikipedia windows) split into the first position of each window (the
attention sink) and the rest, and the same two parts on the evaluation text (news). Each GPTQ
variant then quantizes every linear from its own float-input Hessian (no sequential pass: this
isolates the objective from the propagation) and is scored per linear by the output error
tr(ΔW H ΔWᵀ) relative to RTN's on calibration / evaluation inputs, sink and non-sink rows apart,
and end to end by perplexity, KL and flips with the GPTQ weights put into the float model.

    PYTHONPATH=. .venv/bin/python benchmarks/gptq_layer_study.py --calib-samples 32 \\
        --max-tokens 2048 --variants rtn gptq gptq-sink0.01 --per-block gptq --out study.json
"""
import argparse
import json
import time
from pathlib import Path

import torch

from sagequant.calibration.datasets import tokenize_calibration
from sagequant.calibration.gptq import gptq_quantize
from sagequant.calibration.real_data import evaluation_text, load_smollm2, wikipedia_prose
from sagequant.evaluation.perplexity import compare_to_float, perplexity, tokenize_eval_text
from sagequant.ir.quant_spec import QuantSpec, dequantize, quantize, weight_qparams

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# name -> (sink weight in the calibration Hessian, damp, damp reference, observer, act_order)
VARIANTS = {
    "rtn": None,
    "rtn-mse": None,
    "gptq": (1.0, 0.01, "mean", "minmax", False),
    "gptq-actorder": (1.0, 0.01, "mean", "minmax", True),
    "gptq-mse": (1.0, 0.01, "mean", "mse", False),
    "gptq-damp0.1": (1.0, 0.1, "mean", "minmax", False),
    "gptq-median-damp": (1.0, 0.01, "median", "minmax", False),
    "gptq-sink0.1": (0.1, 0.01, "mean", "minmax", False),
    "gptq-sink0.01": (0.01, 0.01, "mean", "minmax", False),
    "gptq-sink0": (0.0, 0.01, "mean", "minmax", False),
    # sink rows weigh at most c times a mean other row's energy (per layer; a string marks the cap)
    "gptq-sinkcap1": ("cap1", 0.01, "mean", "minmax", False),
    "gptq-sinkcap10": ("cap10", 0.01, "mean", "minmax", False),
    "gptq-sinkcap100": ("cap100", 0.01, "mean", "minmax", False),
    # the cap on down_proj only (its inputs carry the massive sink activations); q/k/v/o/gate/up plain
    "gptq-sinkcap10-down": ("cap10-down", 0.01, "mean", "minmax", False),
    # the first row of each window weighs as 50 rows in the q/k/v Hessians; other linears plain
    "gptq-sink50-qkv": ("50-qkv", 0.01, "mean", "minmax", False),
    "gptq-sink20-qkv": ("20-qkv", 0.01, "mean", "minmax", False),
    "gptq-sink200-qkv": ("200-qkv", 0.01, "mean", "minmax", False),
    # every row of the q/k/v (or only k/v) Hessians weighted by the attention mass its key receives
    # (column sums of the attention probabilities, mean over heads: mean 1 per row, the sink ~S/2)
    "gptq-mass-qkv": ("mass-qkv", 0.01, "mean", "minmax", False),
    "gptq-mass-kv": ("mass-kv", 0.01, "mean", "minmax", False),
}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


class SplitHessian:
    """Σ x xᵀ of one linear input, first position of each sequence (sink) and the rest apart."""

    def __init__(self):
        self.sink = self.rest = None
        self.n_sink = self.n_rest = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float()  # one 512-row product in fp32, the running sum in fp64
        first, rest = x[:, 0], x[:, 1:].reshape(-1, x.shape[-1])
        if self.sink is None:
            self.sink = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
            self.rest = torch.zeros_like(self.sink)
        self.sink += (first.T @ first).double()
        self.rest += (rest.T @ rest).double()
        self.n_sink += first.shape[0]
        self.n_rest += rest.shape[0]

    def hessian(self, sink_weight: float = 1.0) -> torch.Tensor:
        n = self.n_rest + sink_weight * self.n_sink
        return 2.0 * (self.rest + sink_weight * self.sink) / n


# Linears that read the same input share its Hessian.
SHARES_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


def collect(model, batches: torch.Tensor) -> dict:
    """{(block, linear name): SplitHessian} over `batches` [n, L] through the float model."""
    acc, hooks = {}, []
    for b, layer in enumerate(model.model.layers):
        for name in LINEARS:
            if name in SHARES_INPUT:
                continue
            key = (b, name)
            acc[key] = SplitHessian()
            hooks.append(layer.get_submodule(name).register_forward_hook(
                lambda m, a, o, k=key: acc[k].add(a[0])))
    with torch.inference_mode():
        for i in range(batches.shape[0]):
            model(input_ids=batches[i:i + 1], use_cache=False)
    for h in hooks:
        h.remove()
    for b in range(len(model.model.layers)):
        for name, reader in SHARES_INPUT.items():
            acc[(b, name)] = acc[(b, reader)]
    return acc


class MassHessian:
    """Σ m_t x_t x_tᵀ / Σ m_t · 2 of one block's attention input, m_t the attention mass key t gets."""

    def __init__(self):
        self.sum, self.mass, self.n = None, 0.0, 0

    def add(self, x: torch.Tensor, mass: torch.Tensor) -> None:
        rows, m = x.detach().reshape(-1, x.shape[-1]).double(), mass.reshape(-1).double()
        if self.sum is None:
            self.sum = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
        self.sum += (rows * m[:, None]).T @ rows
        self.mass += float(m.sum())
        self.n += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        return 2.0 * self.sum / self.mass


def collect_mass(model, batches: torch.Tensor) -> dict:
    """{block: MassHessian} of the q/k/v input, the attention probabilities from eager attention."""
    inputs, hooks = {}, []
    acc = {b: MassHessian() for b in range(len(model.model.layers))}
    for b, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.q_proj.register_forward_hook(
            lambda m, a, o, b=b: inputs.__setitem__(b, a[0])))
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            for i in range(batches.shape[0]):
                probs = model(input_ids=batches[i:i + 1], use_cache=False, output_attentions=True).attentions
                for b, p in enumerate(probs):   # p [1, heads, queries, keys]
                    acc[b].add(inputs[b], p.float().sum(-2).mean(1))
    finally:
        model.set_attn_implementation(before)
        for h in hooks:
            h.remove()
    return acc


def err(d: torch.Tensor, h: torch.Tensor) -> float:
    return float(((d @ h) * d).sum())


def quantize_all(model, calib_h: dict, variant: str, spec: QuantSpec, mass_h: dict | None = None) -> dict:
    """{(block, linear): dequantized weight} for one variant."""
    out = {}
    for (b, name), acc in calib_h.items():
        w = model.model.layers[b].get_submodule(name).weight.detach().float()
        if VARIANTS[variant] is None:
            s, z = weight_qparams(w, spec, 1.0, "mse" if variant == "rtn-mse" else "minmax")
            out[(b, name)] = dequantize(quantize(w, spec, s, z))
            continue
        sink_w, damp, ref, observer, act_order = VARIANTS[variant]
        if isinstance(sink_w, str) and sink_w.startswith("mass-"):
            weighted = QKV if sink_w == "mass-qkv" else QKV[1:]
            h = mass_h[b].hessian() if name in weighted else acc.hessian()
            out[(b, name)] = gptq_quantize(w, h, spec, damp=damp, act_order=act_order,
                                           observer=observer).dequantized
            continue
        if isinstance(sink_w, str) and sink_w.endswith("-qkv"):
            sink_w = float(sink_w.removesuffix("-qkv")) if name in QKV else 1.0
        if isinstance(sink_w, str) and sink_w.endswith("-down"):
            sink_w = sink_w.removesuffix("-down") if name == "mlp.down_proj" else 1.0
        if isinstance(sink_w, str):
            ratio = (torch.trace(acc.sink) / acc.n_sink) / (torch.trace(acc.rest) / acc.n_rest)
            sink_w = min(1.0, float(sink_w.removeprefix("cap")) / float(ratio))
        h = acc.hessian(sink_w)
        if ref == "median":  # λ = damp · median(diag H), given to gptq_quantize as a fraction of the mean
            diag = torch.diagonal(h)
            damp = damp * float(diag.median() / diag.mean())
        out[(b, name)] = gptq_quantize(w, h, spec, damp=damp, act_order=act_order,
                                       observer=observer).dequantized
    return out


def per_layer_errors(model, q: dict, calib_h: dict, eval_h: dict) -> dict:
    rows = {}
    for key, dq in q.items():
        b, name = key
        d = model.model.layers[b].get_submodule(name).weight.detach().double() - dq.double()
        rows[f"{b}.{name}"] = {
            "calib_rest": err(d, calib_h[key].rest) / calib_h[key].n_rest,
            "calib_sink": err(d, calib_h[key].sink) / calib_h[key].n_sink,
            "eval_rest": err(d, eval_h[key].rest) / eval_h[key].n_rest,
            "eval_sink": err(d, eval_h[key].sink) / eval_h[key].n_sink}
    return rows


def with_weights(model, q: dict):
    """Context: the model's linears hold q's weights inside; restored after."""
    class Swap:
        def __enter__(self):
            self.saved = {}
            for (b, name), dq in q.items():
                mod = model.model.layers[b].get_submodule(name)
                self.saved[(b, name)] = mod.weight.data
                mod.weight.data = dq.to(mod.weight.dtype)

        def __exit__(self, *exc):
            for (b, name), w in self.saved.items():
                model.model.layers[b].get_submodule(name).weight.data = w
    return Swap()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["rtn", "gptq"], choices=list(VARIANTS))
    p.add_argument("--per-block", nargs="*", default=[], choices=list(VARIANTS),
                   help="also: all blocks RTN but one block with this variant, for every block")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--out", default="gptq_layer_study.json")
    p.add_argument("--hessian-cache", help="file to keep the collected Hessians in between runs")
    args = p.parse_args()
    spec = QuantSpec("int4", "per_group", args.group_size)
    model, tok = load_smollm2()
    eval_ids = tokenize_eval_text(tok, evaluation_text(), args.max_tokens)
    calib = tokenize_calibration(wikipedia_prose(), tok, args.calib_samples, 512)
    t = time.perf_counter()
    cache_file = Path(args.hessian_cache) if args.hessian_cache else None
    if cache_file is not None and cache_file.is_file():
        calib_h, eval_h = torch.load(cache_file, weights_only=False)
    else:
        calib_h = collect(model, calib)
        eval_h = collect(model, eval_ids[:eval_ids.numel() // 512 * 512].reshape(-1, 512))
        if cache_file is not None:
            torch.save((calib_h, eval_h), cache_file)
    mass_h = None
    if any(VARIANTS[v] and str(VARIANTS[v][0]).startswith("mass-") for v in args.variants + args.per_block):
        mass_h = collect_mass(model, calib)
    print(f"hessians {time.perf_counter() - t:.0f}s", flush=True)
    cache = {}

    def float_fn(ids):
        k = ids.numpy().tobytes()
        if k not in cache:
            cache[k] = model(input_ids=ids, use_cache=False).logits
        return cache[k]

    def quant_fn(ids):
        return model(input_ids=ids, use_cache=False).logits

    perplexity(float_fn, eval_ids)  # the float logits, cached before any weight is swapped
    results = {"config": vars(args), "variants": {}, "per_block": {}}
    quantized = {}
    for v in dict.fromkeys(args.variants + args.per_block + (["rtn"] if args.per_block else [])):
        t = time.perf_counter()
        quantized[v] = quantize_all(model, calib_h, v, spec, mass_h)
        with with_weights(model, quantized[v]):
            m = compare_to_float(float_fn, quant_fn, eval_ids)
        layers = per_layer_errors(model, quantized[v], calib_h, eval_h)
        results["variants"][v] = {"metrics": m, "layers": layers}
        print(f"{v:<18} ppl {m['ppl_quant']:.3f} ({m['ppl_delta_pct']:+.2f}%) kl {m['kl']:.4f} "
              f"flip {100 * m['flip_rate']:.2f}%  {time.perf_counter() - t:.0f}s", flush=True)
    for v in args.per_block:
        for b in range(len(model.model.layers)):
            mix = {k: (quantized[v] if k[0] == b else quantized["rtn"])[k] for k in quantized["rtn"]}
            with with_weights(model, mix):
                m = compare_to_float(float_fn, quant_fn, eval_ids)
            results["per_block"].setdefault(v, {})[b] = m
            print(f"block {b:2d} {v}: ppl {m['ppl_quant']:.3f} kl {m['kl']:.4f}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(summary(results))


def summary(results: dict) -> str:
    """Per-linear-type error ratios GPTQ variant / RTN, summed over blocks."""
    base = results["variants"].get("rtn")
    if base is None:
        return ""
    lines = ["| variant | linear | calib rest | calib sink | eval rest | eval sink |", "|---|---|---|---|---|---|"]
    for v, r in results["variants"].items():
        if v == "rtn":
            continue
        for name in LINEARS:
            ratio = []
            for part in ("calib_rest", "calib_sink", "eval_rest", "eval_sink"):
                num = sum(x[part] for k, x in r["layers"].items() if k.endswith(name))
                den = sum(x[part] for k, x in base["layers"].items() if k.endswith(name))
                ratio.append(f"{num / den:.3f}")
            lines.append(f"| {v} | {name} | " + " | ".join(ratio) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
