"""Where the calibration Hessian's energy sits (issue 19): for every q/o/down_proj input of
SmolLM2-135M on one Wikipedia calibration window, the largest |x| at the window's first position
vs the rest, and that position's share of Σx² (its share of tr(H) for GPTQ). A share near 1 means
an L2 objective over the window fits that single attention-sink token.

    PYTHONPATH=. .venv/bin/python benchmarks/sink_energy.py --window 1
"""
import argparse

import torch

from sagequant.calibration.datasets import tokenize_calibration
from sagequant.calibration.real_data import load_smollm2, wikipedia_prose


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=1, help="which 512-token calibration window")
    p.add_argument("--min-share", type=float, default=0.0, help="print only inputs with a larger first-position share")
    args = p.parse_args()
    model, tok = load_smollm2()
    ids = tokenize_calibration(wikipedia_prose(), tok, args.window + 1, 512)[args.window:args.window + 1]
    rows = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0][0]
            energy = (x.double() ** 2).sum(-1)
            rows[name] = (float(x[0].abs().max()), float(x[1:].abs().max()), float(energy[0] / energy.sum()))
        return record
    for name, m in model.named_modules():
        if name.endswith(("q_proj", "o_proj", "down_proj")):
            m.register_forward_hook(hook(name))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    print("| input of | max abs x, first position | max abs x, other positions | first position's share of sum x^2 |")
    print("|---|---|---|---|")
    for name, (first, rest, share) in rows.items():
        if share >= args.min_share:
            print(f"| {name} | {first:.1f} | {rest:.1f} | {share:.3f} |")


if __name__ == "__main__":
    main()
