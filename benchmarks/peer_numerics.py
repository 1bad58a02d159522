"""Our base numerics vs llm-compressor's (issue 19): the same model, the same evaluation tokens,
RTN / FP8 applied (a) by `sq.compile`, (b) by our QuantSpec formulas written straight into the
float model's Linear weights, (c) by compressed-tensors' formulas, reimplemented here (llm-compressor itself pins other torch /
transformers versions and is not in this venv; the compressed-tensors library is, and
`library_agrees` checks the reimplementation against its own calculate_qparams / fake_quantize
bit for bit). (a) vs (b) isolates the compiler's graph (which layers, which ops); (b) vs (c) the
formula.

compressed-tensors' formulas (quantization/utils/helpers.py `calculate_qparams`,
lifecycle/forward.py `_quantize`), as reimplemented in `peer_*` below:
  symmetric scale = max(|min|, |max|) / ((q_max - q_min) / 2), in the weight's dtype (fp32 here):
                    int4 / 7.5, int8 / 127.5, fp8 e4m3 / 448;  scale 0 -> eps of its dtype
  codes = round_half_even(clamp(x / scale, q_min, q_max))   (fp8: clamp, then cast)
  dynamic activations: the same per token (row), at run time.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/peer_numerics.py \\
        --schemes w4a16-rtn-g64 w8a8-fp8-dynamic --max-tokens 20000 --out peer.json
    ... --tiny gemma3     # a tiny random Gemma-3: layer coverage and per-layer weights only
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import sagequant as sq
from sagequant.calibration.real_data import evaluation_text, load_smollm2
from sagequant.evaluation.perplexity import perplexity, tokenize_eval_text
from sagequant.ir.quant_spec import QuantSpec, fake_quantize

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
# name -> (QuantConfig kwargs, weight (format, group), activation format or None)
SCHEMES = {
    "w4a16-rtn-g64": (dict(weight_dtype="int4", activation_dtype="a16", group_size=64), ("int4", 64), None),
    "w4a16-rtn-g128": (dict(weight_dtype="int4", activation_dtype="a16", group_size=128), ("int4", 128), None),
    "w8a16-rtn": (dict(weight_dtype="int8", activation_dtype="a16", group_size=128), ("int8", 128), None),
    "w8a8-fp8-dynamic": (dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None),
                         ("fp8_e4m3", None), "fp8_e4m3"),
    "w8a8-int8-dynamic": (dict(weight_dtype="int8", activation_dtype="int8", group_size=None),
                          ("int8", None), "int8"),
}
_RANGE = {"int4": (-8, 7), "int8": (-128, 127), "fp8_e4m3": (-FP8_MAX, FP8_MAX)}


def peer_fake_quant(x: torch.Tensor, fmt: str, group: int | None) -> torch.Tensor:
    """compressed-tensors' symmetric fake quantization of the rows of x (per row, or per `group`
    columns; it refuses a ragged last group, so `group` must divide the row)."""
    q_min, q_max = _RANGE[fmt]
    rows = x.reshape(-1, x.shape[-1])
    if group is not None:
        if rows.shape[-1] % group:
            raise ValueError(f"compressed-tensors has no ragged group: {rows.shape[-1]} % {group}")
        rows = rows.reshape(-1, group)
    lo = rows.amin(-1, keepdim=True).clamp(max=0)
    hi = rows.amax(-1, keepdim=True).clamp(min=0)
    scale = torch.maximum(lo.abs(), hi) / ((q_max - q_min) / 2)
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    clamped = torch.clamp(rows / scale, q_min, q_max)
    codes = clamped.to(torch.float8_e4m3fn).to(x.dtype) if fmt == "fp8_e4m3" else torch.round(clamped)
    return (codes * scale).reshape(x.shape)


def library_agrees(model) -> dict:
    """Per scheme: does peer_fake_quant equal compressed-tensors' own calculate_qparams +
    fake_quantize on every Linear weight of `model` (bit for bit)?"""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    out = {}
    for name, (_, (fmt, group), _) in SCHEMES.items():
        args = QuantizationArgs(num_bits=8 if fmt != "int4" else 4, type="float" if fmt.startswith("fp8") else "int",
                                symmetric=True, strategy="group" if group else "channel", group_size=group)
        same = True
        for mod in linears(model).values():
            w = mod.weight.data
            if group and w.shape[-1] % group:
                continue
            blocks = w.reshape(w.shape[0], -1, group or w.shape[-1])
            scale, zp = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
            same &= torch.equal(ct_fake_quantize(w, scale, zp, args), peer_fake_quant(w, fmt, group))
        out[name] = bool(same)
    return out


def our_spec(fmt: str, group: int | None, scale_dtype: str) -> QuantSpec:
    return QuantSpec(fmt, "per_group" if group else "per_channel", group, True, scale_dtype)


def our_act_spec(fmt: str) -> QuantSpec:
    return QuantSpec(fmt, "per_token", None, True, "fp32", dynamic=True)


def linears(model: torch.nn.Module, ignore=("lm_head",)) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in ignore}


def fake_quantized_copy(model, weight: tuple, act: str | None, formula: str, scale_dtype: str = "fp16"):
    """A copy of `model` whose Linear weights (and, with `act`, inputs) are fake-quantized by
    `formula`: 'peer' (compressed-tensors') or 'ours' (QuantSpec)."""
    qm = copy.deepcopy(model)
    for mod in linears(qm).values():
        w = mod.weight.data
        mod.weight.data = (peer_fake_quant(w, *weight) if formula == "peer"
                           else fake_quantize(w, our_spec(*weight, scale_dtype)))
        if act is not None:
            quant = ((lambda x: peer_fake_quant(x, act, None)) if formula == "peer"
                     else (lambda x, s=our_act_spec(act): fake_quantize(x, s)))
            mod.register_forward_pre_hook(lambda m, args, q=quant: (q(args[0]),))
    return qm


def weight_diffs(model, weight: tuple, scale_dtype: str) -> dict:
    """Per layer: share of elements where our dequantized weight differs from the peer's, and the
    largest difference in units of the peer's step."""
    out = {}
    for name, mod in linears(model).items():
        w = mod.weight.data
        ours = fake_quantize(w, our_spec(*weight, scale_dtype))
        peer = peer_fake_quant(w, *weight)
        diff = (ours - peer).abs()
        out[name] = {"differ_share": float((diff > 0).float().mean()),
                     "max_abs_diff": float(diff.max()),
                     "rel_fro": float(diff.norm() / (w - peer).norm().clamp(min=1e-30))}
    return out


def compiled_vs_peer(model, name: str, ids: torch.Tensor, scale_dtype: str) -> dict:
    """Which layers our compile quantizes vs the peer's targets, and how far apart their logits are
    (relative to the quantization's own effect, the float-vs-peer distance)."""
    kwargs, weight, act = SCHEMES[name]
    cm = sq.compile(model, sq.QuantConfig(**kwargs, scale_precision=scale_dtype, guard="off"),
                    calibration_data=[ids])
    ours = {a.layer for a in cm._annotations() if a.quantized}
    peer = set(linears(model))
    with torch.inference_mode():
        f = model(input_ids=ids, use_cache=False).logits
        p = fake_quantized_copy(model, weight, act, "peer")(input_ids=ids, use_cache=False).logits
        o = cm(ids)
    return {"ours_only": sorted(ours - peer), "peer_only": sorted(peer - ours),
            "ours_vs_peer_rel": float((o - p).norm() / (f - p).norm()),
            "float_vs_peer_rel": float((f - p).norm() / f.norm())}


def tiny_model(arch: str):
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig,
                              Qwen2Config)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    configs = {"gemma3": lambda: Gemma3TextConfig(**common, head_dim=16, sliding_window=8),
               "qwen2": lambda: Qwen2Config(**common), "llama": lambda: LlamaConfig(**common),
               "gpt2": lambda: GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4)}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(configs[arch]()).eval()


def run_tiny(arch: str) -> dict:
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    peer_layers = sorted(linears(model))
    res = {"arch": arch, "peer_targets": len(peer_layers), "library_agrees": library_agrees(model)}
    for name, (_, weight, _) in SCHEMES.items():
        if weight[1] is None or weight[1] <= 64:
            res[name] = {sd: compiled_vs_peer(model, name, ids, sd) for sd in ("fp16", "fp32")}
    return res


def run_real(schemes: list[str], max_tokens: int, out: Path) -> dict:
    results = json.loads(out.read_text()) if out.exists() else {}
    model, tok = load_smollm2()
    results["library_agrees"] = library_agrees(model)
    print("reimplementation == compressed-tensors:", results["library_agrees"], flush=True)
    ids = tokenize_eval_text(tok, evaluation_text(), max_tokens)
    float_fn = lambda x: model(input_ids=x, use_cache=False).logits  # noqa: E731
    with torch.inference_mode():
        results.setdefault("float", {"ppl": perplexity(float_fn, ids).ppl})
    for name in schemes:
        kwargs, weight, act = SCHEMES[name]
        row = {}
        for label, formula, sd in (("peer_formula", "peer", None), ("our_formula_fp16", "ours", "fp16"),
                                   ("our_formula_fp32", "ours", "fp32")):
            qm = fake_quantized_copy(model, weight, act, formula, sd or "fp16")
            with torch.inference_mode():
                row[label] = perplexity(lambda x: qm(input_ids=x, use_cache=False).logits, ids).ppl
            del qm
        for sd in ("fp16", "fp32"):
            cm = sq.compile(model, sq.QuantConfig(**kwargs, scale_precision=sd, guard="off"),
                            calibration_data=[ids[:512][None]])
            with torch.inference_mode():
                row[f"compiled_{sd}"] = perplexity(cm, ids).ppl
        row["weights_fp16_vs_peer"] = _summary(weight_diffs(model, weight, "fp16"))
        row["weights_fp32_vs_peer"] = _summary(weight_diffs(model, weight, "fp32"))
        results[name] = row
        print(name, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}, flush=True)
        out.write_text(json.dumps(results, indent=1))
    return results


def _summary(per_layer: dict) -> dict:
    shares = [v["differ_share"] for v in per_layer.values()]
    return {"layers": len(per_layer), "mean_differ_share": sum(shares) / len(shares),
            "max_differ_share": max(shares), "max_rel_fro": max(v["rel_fro"] for v in per_layer.values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="*", default=["w4a16-rtn-g64", "w8a8-fp8-dynamic"], choices=list(SCHEMES))
    p.add_argument("--max-tokens", type=int, default=20000)
    p.add_argument("--tiny", nargs="*", choices=["gemma3", "qwen2", "llama", "gpt2"])
    p.add_argument("--out", default="peer_numerics.json")
    args = p.parse_args()
    if args.tiny:
        for arch in args.tiny:
            print(json.dumps(run_tiny(arch), indent=1))
        return
    run_real(args.schemes, args.max_tokens, Path(args.out))


if __name__ == "__main__":
    main()
