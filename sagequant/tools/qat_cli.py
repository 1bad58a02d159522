"""`sagequant qat`: quantization-aware training on a text dataset, then the same artifact as
`sagequant compile` (api.quantization_aware_training does the work)."""
from __future__ import annotations

import argparse

from ..calibration.qat import LOSSES, QATOptions
from ..safe_write import check_output_dir
from .compile_flags import config_from_args, print_report
from .arg_types import int_at_least, non_negative_float, non_negative_int, positive_float, positive_int


def add_qat_parser(sub, add_compile_flags) -> None:
    q = sub.add_parser("qat", help="quantization-aware training (FakeQuant + LoRA), then compile "
                                   "to the same artifact as PTQ")
    add_compile_flags(q, dataset_required=True)  # --dataset: the training text (.jsonl / plain)
    budget = q.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive_int, help="optimizer steps (default 100)")
    budget.add_argument("--epochs", type=positive_int, help="passes over the training windows instead of --steps")
    q.add_argument("--lr", type=positive_float, default=QATOptions.lr, help="adapter learning rate")
    q.add_argument("--scale-lr", type=non_negative_float, default=QATOptions.scale_lr, help="LSQ scale learning rate")
    q.add_argument("--batch-size", type=positive_int, default=QATOptions.batch_size)
    q.add_argument("--train-seq-len", type=int_at_least(2), default=QATOptions.seq_len, help="training window in tokens")
    q.add_argument("--lora-rank", type=non_negative_int, default=QATOptions.lora_rank,
                   help="LoRA rank (peft); 0 trains the quantized layers' weights directly")
    q.add_argument("--lora-alpha", type=positive_float, default=QATOptions.lora_alpha)
    q.add_argument("--loss", default=QATOptions.loss, help=f"{' | '.join(LOSSES)} (distill: KL to the float model)")
    q.add_argument("--warmup-steps", type=non_negative_int, default=QATOptions.warmup_steps)
    q.add_argument("--freeze-observers-step", type=non_negative_int, help="observers stop updating scales from this step")
    q.add_argument("--no-learn-scales", action="store_true", help="observed scales instead of LSQ-learned ones")
    q.add_argument("--checkpoint-dir", help="write adapter/scale checkpoints (safetensors) here")
    q.add_argument("--checkpoint-every", type=positive_int, help="checkpoint every N steps (needs --checkpoint-dir)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_qat)


def cmd_qat(args: argparse.Namespace) -> int:
    from ..calibration.data_sources import load_dataset
    from ..frontends.models import resolve_model
    from ..api import quantization_aware_training

    cfg = config_from_args(args).replace(enable_qat=True, qat_learn_scales=not args.no_learn_scales)
    options = QATOptions(
        steps=None if args.epochs else (QATOptions.steps if args.steps is None else args.steps),
        epochs=args.epochs,
        lr=args.lr, scale_lr=args.scale_lr, batch_size=args.batch_size, seq_len=args.train_seq_len,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, loss=args.loss,
        warmup_steps=args.warmup_steps, freeze_observers_step=args.freeze_observers_step,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, seed=args.seed)
    check_output_dir(args.output, args.overwrite, what="artifact")  # before the training
    texts = load_dataset(args.dataset, args.text_field, args.train_seq_len)
    model, tok = resolve_model(args.model)
    cm = quantization_aware_training(model, cfg, texts, tok, options)
    cm.graph.model_info["source"] = args.model
    stats = next(p["stats"] for p in cm.pass_history if p["pass"] == "qat_train")
    print(f"qat: {stats['steps']} steps, {stats['tokens']:,} tokens, {stats['seconds']:.1f} s; "
          f"loss {stats['loss_first']:.4f} -> {stats['loss_last']:.4f} ({options.loss})")
    path = cm.save(args.output, overwrite=args.overwrite)
    print_report(cm.report())
    print(f"artifact: {path}")
    return 0
