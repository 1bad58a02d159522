"""QAT vs PTQ on the real SmolLM2-135M: perplexity of float, W4A16 g128 round-to-nearest PTQ and
the same scheme after a fixed small QAT budget (LoRA + LSQ scales, distilled from the float model)
on the Wikipedia prose, evaluated on the held-out news text. Prints a Markdown row set and writes
JSON with the loss curve.

    python benchmarks/qat_recovery.py --steps 16 --train-seq-len 256 --out qat.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch

import sagequant as sq
from sagequant.calibration.qat import QATOptions, quantization_aware_training
from sagequant.calibration.real_data import evaluation_text, load_smollm2, wikipedia_prose
from sagequant.tools.evaluate import delta_pct, perplexity, tokenize_eval_text

SCHEME = dict(weight_dtype="int4", activation_dtype="a16", group_size=128, symmetric=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--train-seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--scale-lr", type=float, default=5e-5)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--loss", default="distill")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine OpenMP hand-offs cost more than they give)")
    ap.add_argument("--out", default="qat_recovery.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    eval_ids = tokenize_eval_text(tok, evaluation_text(), args.max_tokens)

    def ppl(fn):
        return perplexity(fn, eval_ids, window=args.window, stride=args.window).ppl

    t0 = time.perf_counter()
    rows = {"float": ppl(lambda ids: model(input_ids=ids, use_cache=False).logits)}
    print(f"float ppl {rows['float']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    cfg = sq.QuantConfig(**SCHEME, guard="off")
    t = time.perf_counter()
    rows["ptq_rtn"] = ppl(sq.compile(model, cfg))
    print(f"PTQ RTN ppl {rows['ptq_rtn']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)

    opts = QATOptions(steps=args.steps, seq_len=args.train_seq_len, batch_size=args.batch_size,
                      lr=args.lr, scale_lr=args.scale_lr, lora_rank=args.lora_rank, loss=args.loss)
    t = time.perf_counter()
    qat = quantization_aware_training(model, cfg.replace(enable_qat=True), wikipedia_prose(), tok, opts)
    qat_s = time.perf_counter() - t
    train = next(p["stats"] for p in qat.pass_history if p["pass"] == "qat_train")
    rows["qat"] = ppl(qat)
    lost = rows["ptq_rtn"] - rows["float"]
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "eval": f"lee_background.cor first {eval_ids.numel()} tokens, {args.window}-token windows",
        "train_text": "gensim enwiki prose (disjoint from the evaluation text)",
        "ppl": rows, "delta_pct": {k: delta_pct(rows["float"], v) for k, v in rows.items()},
        "recovered_share": (rows["ptq_rtn"] - rows["qat"]) / lost if lost > 0 else None,
        "train_seconds": train["seconds"], "qat_total_seconds": qat_s, "train_tokens": train["tokens"],
        "loss_first": train["loss_first"], "loss_last": train["loss_last"], "losses": train["losses"],
        "trainable_params": train["trainable_params"], "options": train["options"],
        "kernels": qat.report()["kernels"],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"| float | {rows['float']:.3f} | - |")
    print(f"| W4A16 g128 RTN (PTQ) | {rows['ptq_rtn']:.3f} | {result['delta_pct']['ptq_rtn']:+.2f}% |")
    print(f"| W4A16 g128 QAT | {rows['qat']:.3f} | {result['delta_pct']['qat']:+.2f}% | "
          f"recovered {100 * result['recovered_share']:.0f}% | train {train['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
