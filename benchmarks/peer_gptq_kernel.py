"""GPTQ's inner loop against llm-compressor's, on the same weight, Hessian and group scales (issue 19,
BENCHMARKS §2l): is a perplexity gap between the tools in the algorithm or in what each feeds it?

Seeded weights and a Hessian from heavy-tailed inputs; int4 symmetric groups, fp32 scales from our
minmax observer handed to both. Ours: `calibration.gptq.gptq_quantize`; the peer:
`llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight` (0.14), with each of its activation
orderings. Without act-order the two differ by design: ours takes a group's scale from its
error-updated columns when GPTQ reaches the group (as the GPTQ paper and AutoGPTQ do), the peer fixes
all scales from the original weight up front. Run from the llm-compressor venv
(benchmarks/llmcompressor_baseline.py says how to make it):

    OMP_NUM_THREADS=1 /work/lcvenv/bin/python benchmarks/peer_gptq_kernel.py
"""
import argparse

import torch
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

from sagequant.calibration.gptq import gptq_quantize
from sagequant.ir.quant_spec import QuantSpec, weight_qparams


def case(out: int, cols: int, group: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, cols, generator=g) * torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    h = 2.0 / x.shape[0] * x.T @ x
    w = 0.05 * torch.randn(out, cols, generator=g)
    spec = QuantSpec(format="int4", granularity="per_group", group_size=group, symmetric=True, scale_dtype="fp32")
    scales, _ = weight_qparams(w, spec)

    def error(q):   # tr((W - Q) H (W - Q)^T), GPTQ's objective
        d = (w - q).double()
        return float(((d @ h.double()) * d).sum())

    rows = []
    for ours_act_order, peer_orders in ((True, ("static", "weight")), (False, (None,))):
        ours = gptq_quantize(w, h, spec, act_order=ours_act_order).dequantized
        for order in peer_orders:
            args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                                    group_size=group, actorder=order)
            peer = quantize_weight(w[None].clone(), h[None].clone(), scales[None].float(),
                                   torch.zeros_like(scales, dtype=torch.int8)[None], None, args)[0][0]
            rows.append({"shape": f"{out}x{cols} g{group} seed {seed}", "ours act_order": ours_act_order,
                         "peer actorder": order, "ours error": error(ours), "peer error": error(peer),
                         "weights differing": float((ours != peer).float().mean())})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["96x256x64", "192x576x64", "128x1536x128"],
                   metavar="OUTxCOLSxGROUP")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    print("| case | ours act_order | peer actorder | ours error | peer error | weights differing |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        out, cols, group = (int(v) for v in shape.split("x"))
        for seed in args.seeds:
            for r in case(out, cols, group, seed):
                print(f"| {r['shape']} | {r['ours act_order']} | {r['peer actorder']} | {r['ours error']:.4f} | "
                      f"{r['peer error']:.4f} | {100 * r['weights differing']:.2f}% |")


if __name__ == "__main__":
    main()
