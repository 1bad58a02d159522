"""Where a W8A8 scheme's loss is on SmolLM2-135M: weights only, activations only, or both (BENCHMARKS §2i).

Formula level, no compile: forward pre-hooks round-trip every nn.Linear's input per token, and its
weight is replaced by the per-output-channel round trip (absmax scales, fp32), lm_head excepted.
Each variant is `WEIGHT:ACT[:OBSERVER]` with `-` for "keep float" (after `--`, since a variant
may start with `-`), e.g.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/w8a8_split.py --max-tokens 2048 -- \
        fp8_e4m3:- -:fp8_e4m3 fp8_e4m3:fp8_e4m3 int8:- -:int8 int8:int8

--keep-first 1 leaves each window's first position (the attention sink) unquantized in every input.
"""
import argparse

import torch

from sagequant.calibration.real_data import evaluation_text, load_smollm2
from sagequant.evaluation.perplexity import compare_to_float, tokenize_eval_text
from sagequant.ir.quant_spec import QuantSpec, dequantize, fake_quantize, quantize, weight_qparams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="WEIGHT:ACT[:OBSERVER], formats as in QuantSpec, '-' = float")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--keep-first", type=int, default=0, metavar="N",
                   help="leave each window's first N positions' activations unquantized (the attention "
                   "sink kept in 16 bits, PrefixQuant-style)")
    args = p.parse_args()
    model, tok = load_smollm2()
    ids = tokenize_eval_text(tok, evaluation_text(), args.max_tokens)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    float_weights = {n: m.weight.data.clone() for n, m in linears.items()}
    reference = {}
    with torch.inference_mode():   # the float logits, before any weight changes
        for window in ids.split(512):
            reference[window.numpy().tobytes()] = model(input_ids=window[None], use_cache=False).logits

    def quant_fn(x):
        return model(input_ids=x, use_cache=False).logits

    for variant in args.variants:
        weight_fmt, act_fmt, *rest = variant.split(":")
        observer = rest[0] if rest else "minmax"
        hooks = []
        for name, m in linears.items():
            if weight_fmt != "-":
                spec = QuantSpec(weight_fmt, "per_channel", None, True, "fp32")
                scale, zero = weight_qparams(float_weights[name], spec, 1.0, observer)
                m.weight.data = dequantize(quantize(float_weights[name], spec, scale, zero))
            if act_fmt != "-":
                spec = QuantSpec(act_fmt, "per_token", None, True, "fp32", dynamic=True)
                hooks.append(m.register_forward_pre_hook(
                    lambda mod, a, spec=spec: (_round_trip(a[0], spec, args.keep_first),)))
        r = compare_to_float(lambda x: reference[x[0].numpy().tobytes()], quant_fn, ids)
        for h in hooks:
            h.remove()
        for name, m in linears.items():
            m.weight.data = float_weights[name].clone()
        print(f"{variant:<28} ppl {r['ppl_quant']:.3f}  Δ {r['ppl_delta_pct']:+.2f} ± {r['ppl_delta_pct_se']:.2f}%  "
              f"KL {r['kl']:.4f} ± {r['kl_se']:.4f}  flips {100 * r['flip_rate']:.2f}%", flush=True)


def _round_trip(x: torch.Tensor, spec: QuantSpec, keep_first: int) -> torch.Tensor:
    """x [batch, seq, features] fake-quantized per token, but its first keep_first positions."""
    if keep_first == 0:
        return fake_quantize(x, spec)
    return torch.cat([x[:, :keep_first], fake_quantize(x[:, keep_first:], spec)], dim=1)


if __name__ == "__main__":
    main()
