"""The flags `sagequant compile`, `calibrate` and `qat` share, the QuantConfig they build, and the
one-screen summary of a compile's report they print."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ConfigError, QuantConfig
from ..passes.pipeline import PTQ_PASSES
from ..config.calibration import AWQ_SCALE_LOSSES
from .arg_types import (awq_sink_weight, group_size, non_negative_float, positive_float, positive_int, sink_weight,
                        unit_ratio)


def _read_config_file(path: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    try:
        base = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: invalid JSON ({e.msg} at line {e.lineno}, "
                          f"column {e.colno})") from None
    if not isinstance(base, dict):
        raise ConfigError(f"--config {path}: must hold a JSON object of QuantConfig fields, got "
                          f"{type(base).__name__}")
    return base


def config_from_args(args) -> QuantConfig:
    base = _read_config_file(args.config) if args.config else {}
    flags = {"weight_dtype": args.weight_dtype, "activation_dtype": args.activation_dtype,
             "calibration": args.method, "kv_cache_dtype": args.kv_quant, "backend": args.backend,
             "priority": args.priority, "clip_ratio": args.clip_ratio,
             "calibration_samples": args.samples, "calibration_seq_len": args.seq_len,
             "fallback": args.fallback, "guard": args.guard,
             "target_bits_per_weight": args.target_bits, "target_max_delta_loss": args.target_delta_loss,
             "rotate": args.rotate, "gptq_sink_weight": args.gptq_sink_weight,
             "awq_sink_weight": args.awq_sink_weight, "awq_scale_loss": args.awq_scale_loss}
    if args.asymmetric:
        flags["symmetric"] = False
    if args.ignore is not None:
        flags["ignore"] = args.ignore
    base.update({k: v for k, v in flags.items() if v is not None})
    if args.group_size is not None:  # 0: per-channel, QuantConfig's group_size=None
        base["group_size"] = args.group_size or None
    return QuantConfig.from_dict(base)


def add_compile_flags(p: argparse.ArgumentParser, dataset_required: bool,
                      default_dataset: str | None = None) -> None:
    """`default_dataset`: what --dataset is when left out (recorded as args.default_dataset)."""
    p.add_argument("--model", required=True, help='"smollm2" (the packaged real model), a transformers '
                   "checkpoint dir, a .gguf file or a dir holding one")
    p.add_argument("--dataset", required=dataset_required,
                   help="calibration data: wikipedia | news (packaged texts), a .jsonl file, a plain text "
                   "file, a directory of text files, or token ids (.npy / .safetensors)"
                   + (f" (default: {default_dataset})" if default_dataset else ""))
    p.set_defaults(default_dataset=default_dataset)
    p.add_argument("--text-field", default="text", help="the JSONL field holding the text (default: text)")
    p.add_argument("--output", required=True, help="artifact directory to write (absent, empty, or a "
                   "previous artifact; anything else needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --output / --dump-dir holding files sagequant did not write "
                   "(only sagequant's own files there are replaced; the others stay)")
    p.add_argument("--config", help="QuantConfig JSON file; flags below override its fields")
    p.add_argument("--method", help="calibration: minmax | percentile | smoothquant | awq | gptq")
    p.add_argument("--gptq-sink-weight", type=sink_weight, metavar="W",
                   help="GPTQ: each calibration sequence's first position (the attention sink) weighs as W "
                   "rows in the Hessians of the linears reading the attention input (q/k/v); 1: plain GPTQ; "
                   "'attention': every row there weighs the attention mass its position receives")
    p.add_argument("--awq-sink-weight", type=awq_sink_weight, metavar="W",
                   help="AWQ: each calibration sequence's first position (the attention sink) counts as W "
                   "positions in the scale and clip search losses; 1 (default): sampled like any position")
    p.add_argument("--awq-scale-loss", choices=AWQ_SCALE_LOSSES,
                   help="AWQ: where the scale search measures a group's error: linear (default: each "
                   "consumer linear's output) | module (the output of the module they feed, e.g. the MLP's)")
    p.add_argument("--weight-dtype", help="int8 | int4 | fp8 | nf4 | w8a16 | w4a16 | w8a8")
    p.add_argument("--activation-dtype", help="a16 (fp16/bf16) | int8 | fp8")
    p.add_argument("--kv-quant", help="none | int8 | fp8")
    p.add_argument("--group-size", type=group_size, help="weight group size; 0 for per-channel")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric weights (uint4/uint8 + zero point)")
    p.add_argument("--clip-ratio", type=unit_ratio, help="fraction (0, 1] of the observed range to keep")
    p.add_argument("--backend")
    p.add_argument("--priority", help="latency | throughput | memory")
    p.add_argument("--fallback", help="backend whose kernels may be used where --backend has none")
    p.add_argument("--ignore", nargs="*", help="layer patterns kept in high precision (default: lm_head)")
    p.add_argument("--samples", type=positive_int, help="calibration samples")
    p.add_argument("--seq-len", type=positive_int, help="calibration sample length in tokens")
    p.add_argument("--guard", help="accuracy guard on held-back calibration data: enforce (default: fail "
                   "past the bounds) | report (only record) | off")
    p.add_argument("--rotate", help="QuaRot-style rotation before quantizing: off (default) | hadamard | "
                                    "random (fused into the weights, plus an online Hadamard before down_proj)")
    p.add_argument("--target-bits", type=positive_float, help="mixed precision: average bits per weight budget")
    p.add_argument("--target-delta-loss", type=non_negative_float,
                   help="mixed precision: largest summed per-layer delta loss (nats)")
    p.add_argument("--print-ir-after", action="append", metavar="PASS", type=_pass_name(allow_all=True),
                   help=f"print the IR after PASS (repeatable, or 'all'); passes: {', '.join(PTQ_PASSES)}")
    p.add_argument("--stop-after", metavar="PASS", type=_pass_name(allow_all=False),
                   help="stop the pipeline after PASS")
    p.add_argument("--dump-dir", help="write numbered IR files, one per pass")


def _pass_name(allow_all: bool):
    def parse(text: str) -> str:
        if text in PTQ_PASSES or (allow_all and text == "all"):
            return text
        raise argparse.ArgumentTypeError(f"unknown pass {text!r}; passes: {', '.join(PTQ_PASSES)}"
                                         + (" (or 'all')" if allow_all else ""))
    parse.__name__ = "pass name"
    return parse


def print_report(rep: dict) -> None:
    wb = rep["weight_bytes"]
    print(f"scheme {rep['scheme']} on {rep['backend']} ({rep['priority']}): "
          f"{rep['quantized_layers']}/{rep['linear_layers']} linear layers quantized")
    print(f"weights: {wb['quantized_layers_bytes']:,} bytes for quantized layers "
          f"({wb['quantized_layers_ratio_vs_fp16']:.3f}x fp16, {wb['bits_per_weight']:.2f} bits/weight); "
          f"all linears {wb['all_linear_ratio_vs_fp16']:.3f}x fp16")
    print("kernels: " + ", ".join(f"{k} x{v}" for k, v in rep["kernels"].items()))
    if rep["kept_in_high_precision"]:
        print("kept in high precision: " + ", ".join(f"{k} ({v})" for k, v in rep["kept_in_high_precision"].items()))
    if rep["fallbacks"]:
        print(f"FALLBACK kernels used for {len(rep['fallbacks'])} layers (QuantConfig.fallback)")
    guard, mixed = rep.get("accuracy_guard"), rep.get("mixed_precision")
    if guard and "kl" in guard:
        worst = guard["worst_layers"][0] if guard["worst_layers"] else None
        print(f"accuracy guard ({guard['mode']}, {guard['held_back']['tokens']} held-back tokens): KL "
              f"{guard['kl']:.4g}, top-1 agreement {guard['top1_agreement']:.3f}, delta loss "
              f"{guard['delta_loss']:.4g} nats"
              + (f", worst layer {worst['layer']} {worst['local_sqnr_db']:.1f} dB" if worst else "")
              + ("" if guard["passed"] else "; OUTSIDE BOUNDS: " + "; ".join(guard["violations"])))
    elif guard:
        print(f"accuracy guard not run: {guard['skipped']}")
    if mixed and "upgraded" in mixed:
        print(f"mixed precision: {mixed['layers_per_option']}, {mixed['bits_per_weight']:.2f} bits/weight, "
              f"predicted delta loss {mixed['predicted_delta_loss']:.4g} nats")
    print("passes: " + "  ".join(f"{p['pass']}={p.get('seconds', 0):.2f}s" for p in rep["passes"]))
