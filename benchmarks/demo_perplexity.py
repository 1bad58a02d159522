"""Benchmark behind BENCHMARKS.md's first table: the demo's float vs W8A16 vs W4A16-RTN g128
perplexity, weight bytes and pass times on the real SmolLM2-135M, written as JSON + a Markdown row set.

    .venv/bin/python benchmarks/demo_perplexity.py --max-tokens 20000 --calib-samples 32 --json out.json
"""
import argparse
import json

from sagequant.tools.demo import add_demo_args, format_demo, run_demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_args(p)
    args = p.parse_args()
    result = run_demo(args.max_tokens, args.window, args.calib_samples)
    print(format_demo(result))
    print()
    print("| scheme | ppl | Δ% vs float | quantized-layer bytes | ratio vs fp16 | all-linear ratio vs fp16 | compile s |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        wb = r.get("weight_bytes")
        cells = ([f"{wb['quantized_layers_bytes']:,}", f"{wb['quantized_layers_ratio_vs_fp16']:.3f}",
                  f"{wb['all_linear_ratio_vs_fp16']:.3f}", f"{r['compile_s']:.1f}"] if wb else ["-", "1.000", "1.000", "-"])
        print(f"| {r['name']} | {r['ppl']:.3f} | {r['delta_pct']:+.2f} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
