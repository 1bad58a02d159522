"""QAT vs PTQ on the real SmolLM2-135M: perplexity of float, W4A16 g128 round-to-nearest PTQ and
the same scheme after a fixed small QAT budget (LoRA + LSQ scales, distilled from the float model)
on the Wikipedia prose, evaluated on the held-out news text. Prints the numbers and writes
JSON with the loss curve (float and PTQ ppl, QAT loss curve, time, share of PTQ's loss recovered).

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
from sagequant.api import quantization_aware_training
from sagequant.calibration.qat import QATOptions
from sagequant.calibration.real_data import evaluation_text, load_smollm2, wikipedia_prose
from sagequant.evaluation.perplexity import perplexity, tokenize_eval_text

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
    ap.add_argument("--only", choices=("all", "baselines", "qat"), default="all",
                    help="run part of it (two processes in parallel on a shared machine)")
    ap.add_argument("--out", default="qat_recovery.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    eval_ids = tokenize_eval_text(tok, evaluation_text(), args.max_tokens)

    def ppl(fn):
        return perplexity(fn, eval_ids, window=args.window, stride=args.window).ppl

    cfg = sq.QuantConfig(**SCHEME, guard="off")
    result = {"date": date.today().isoformat(),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "eval": f"lee_background.cor first {eval_ids.numel()} tokens, {args.window}-token windows",
              "ppl": {}}
    if args.only in ("all", "baselines"):
        t = time.perf_counter()
        result["ppl"]["float"] = ppl(lambda ids: model(input_ids=ids, use_cache=False).logits)
        print(f"float ppl {result['ppl']['float']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
        t = time.perf_counter()
        result["ppl"]["ptq_rtn"] = ppl(sq.compile(model, cfg))
        print(f"PTQ RTN ppl {result['ppl']['ptq_rtn']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    if args.only in ("all", "qat"):
        opts = QATOptions(steps=args.steps, seq_len=args.train_seq_len, batch_size=args.batch_size,
                          lr=args.lr, scale_lr=args.scale_lr, lora_rank=args.lora_rank, loss=args.loss)
        t = time.perf_counter()
        qat = quantization_aware_training(model, cfg.replace(enable_qat=True), wikipedia_prose(), tok, opts)
        train = next(p["stats"] for p in qat.pass_history if p["pass"] == "qat_train")
        result.update({"train_text": "gensim enwiki prose (disjoint from the evaluation text)",
                       "train_seconds": train["seconds"], "qat_total_seconds": time.perf_counter() - t,
                       "train_tokens": train["tokens"], "loss_first": train["loss_first"],
                       "loss_last": train["loss_last"], "losses": train["losses"],
                       "trainable_params": train["trainable_params"], "options": train["options"],
                       "kernels": qat.report()["kernels"]})
        result["ppl"]["qat"] = ppl(qat)
        print(f"QAT ppl {result['ppl']['qat']:.3f}; train {train['seconds']:.0f} s, loss "
              f"{train['loss_first']:.4f} -> {train['loss_last']:.4f}", flush=True)
    rows = result["ppl"]
    if {"float", "ptq_rtn", "qat"} <= set(rows):
        lost = rows["ptq_rtn"] - rows["float"]
        result["recovered_share"] = (rows["ptq_rtn"] - rows["qat"]) / lost
        print(f"QAT recovers {100 * result['recovered_share']:.0f}% of PTQ's loss")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
