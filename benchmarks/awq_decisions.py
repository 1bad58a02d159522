"""AWQ's decisions, recorded and compared across devices (issue 17: GPU vs CPU parity).

Runs the layer-wise W4A16 g128 AWQ compile of SmolLM2-135M (the `w4a16-awq` row of
ptq_accuracy.py) on --device, recording every scale search (its inputs' statistics, the loss of each
grid candidate, the chosen ratio) and every clip search (the chosen shrink per row and group), in
call order, which is the same on every device. `--compare A B` then reports where two runs part:
the first search whose inputs differ, how far apart the candidate losses are, and how many
decisions flipped. `--perturb EPS` multiplies every float weight by (1 + EPS * N(0, 1)) (seeded)
before the compile: the spread of the result under float-level noise, next to the device gap.

    python3 benchmarks/awq_decisions.py --device cuda --out gpu.pt --eval 8192
    python3 benchmarks/awq_decisions.py --device cpu --out cpu.pt --eval 8192
    python3 benchmarks/awq_decisions.py --compare cpu.pt gpu.pt
"""
import argparse
import json
import time

import torch

import sagequant as sq
import sagequant.passes.awq as awq_pass
from sagequant.calibration.datasets import tokenize_calibration
from sagequant.calibration.real_data import evaluation_text, load_smollm2, wikipedia_prose
from sagequant.evaluation.perplexity import compare_to_float, tokenize_eval_text


def recording(searches: list):
    """Wrap the pass's two searches so each call appends what it saw and chose."""
    scales_fn, clip_fn = awq_pass.awq_search_scales, awq_pass.awq_search_clip

    def scales(x, weights, spec, **kw):
        found = scales_fn(x, weights, spec, **kw)
        searches.append({"kind": "scales", "x_mean_abs": kw["x_mean_abs"].detach().double().cpu(),
                         "x_sq": float(x.double().pow(2).sum()), "losses": found.losses,
                         "ratio": found.ratio, "duo": found.duo})
        return found

    def clip(x, weight, spec, **kw):
        found = clip_fn(x, weight, spec, **kw)
        searches.append({"kind": "clip", "x_sq": float(x.double().pow(2).sum()),
                         "w_sq": float(weight.double().pow(2).sum()),
                         "shrink": found.shrink.detach().cpu(), "loss": found.loss})
        return found
    awq_pass.awq_search_scales, awq_pass.awq_search_clip = scales, clip


def perturb(model: torch.nn.Module, eps: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + eps * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def compare(path_a: str, path_b: str) -> None:
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    print(f"A {path_a}: {a['meta']}\nB {path_b}: {b['meta']}")
    sa, sb = a["searches"], b["searches"]
    if len(sa) != len(sb):
        print(f"different numbers of searches: {len(sa)} vs {len(sb)}")
    first_input_diff = None
    ratio_flips, clip_flips, clip_total = [], 0, 0
    for i, (x, y) in enumerate(zip(sa, sb)):
        d_in = rel(x["x_sq"], y["x_sq"])
        if first_input_diff is None and d_in > 0:
            first_input_diff = i
        if x["kind"] == "scales":
            la, lb = torch.tensor(x["losses"]), torch.tensor(y["losses"])
            d_loss = float(((la - lb).abs() / la.abs().clamp(min=1e-30)).max())
            # the gap between the best and second-best candidate: how near a tie the choice was
            top2 = la.topk(2, largest=False).values
            gap = float((top2[1] - top2[0]) / top2[0])
            flipped = x["ratio"] != y["ratio"] or x["duo"] != y["duo"]
            d_mean = float(((x["x_mean_abs"] - y["x_mean_abs"]).abs() / x["x_mean_abs"].clamp(min=1e-30)).max())
            if flipped:
                ratio_flips.append(i)
            print(f"{i:4d} scales  input Δ {d_in:.2e}  mean|x| Δmax {d_mean:.2e}  loss Δmax {d_loss:.2e}  "
                  f"best-gap {gap:.2e}  ratio {x['ratio']:.2f}/{y['ratio']:.2f}{'  FLIP' if flipped else ''}")
        else:
            diff = int((x["shrink"] != y["shrink"]).sum())
            clip_flips += diff
            clip_total += x["shrink"].numel()
            print(f"{i:4d} clip    input Δ {d_in:.2e}  weight Δ {rel(x['w_sq'], y['w_sq']):.2e}  "
                  f"loss Δ {rel(x['loss'], y['loss']):.2e}  shrink flips {diff}/{x['shrink'].numel()}")
    print(f"first search with different inputs: {first_input_diff}; scale-ratio flips at {ratio_flips}; "
          f"clip flips {clip_flips}/{clip_total} ({100 * clip_flips / max(clip_total, 1):.3f}%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="where the recorded searches go (a torch file of tensors and numbers)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval", type=int, default=0, metavar="TOKENS",
                   help="also the perplexity vs float on the first TOKENS news tokens (CPU)")
    p.add_argument("--perturb", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    if args.perturb:
        perturb(model, args.perturb, args.seed)
    calib = tokenize_calibration(wikipedia_prose(), tok, args.calib_samples, 512)
    cfg = sq.QuantConfig(weight_dtype="int4", activation_dtype="a16", calibration="awq", group_size=128,
                         symmetric=True, scale_precision="fp32", calibration_samples=args.calib_samples,
                         calibration_seq_len=512, guard="off")
    searches: list = []
    recording(searches)
    t = time.perf_counter()
    cm = sq.compile(model, cfg, calibration_data=calib, device=args.device)
    meta = {"device": args.device, "perturb": args.perturb, "seed": args.seed,
            "compile_s": round(time.perf_counter() - t, 1), "torch": str(torch.__version__),
            "threads": torch.get_num_threads()}
    if args.eval:
        eval_ids = tokenize_eval_text(tok, evaluation_text(), args.eval)
        with torch.inference_mode():
            res = compare_to_float(lambda ids: model(input_ids=ids, use_cache=False).logits, cm, eval_ids)
        meta.update(ppl=res["ppl_quant"], ppl_float=res["ppl_float"], kl=res["kl"], flip_rate=res["flip_rate"])
    print(json.dumps(meta))
    torch.save({"meta": meta, "searches": searches}, args.out)


if __name__ == "__main__":
    main()
