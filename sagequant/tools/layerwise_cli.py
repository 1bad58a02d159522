"""CLI of the layer-wise compile: --device / --work-dir / --offload-cache / --dtype on calibrate
and compile, and `sagequant plan` (the pre-flight estimate, refusing a run that cannot fit)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ConfigError
from .compile_flags import add_compile_flags, config_from_args

DTYPES = ("float32", "bfloat16", "float16")


def add_layerwise_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="calibrate layer-wise on this device: auto (the GPU when present) | "
                   "cuda | cpu; one decoder block at a time is read from the checkpoint's safetensors, "
                   "calibrated, quantized and recorded in --work-dir (without --device: the whole model "
                   "in CPU memory through the full pass pipeline)")
    p.add_argument("--work-dir", help="layer-wise: where finished blocks are recorded; the same command "
                   "run again resumes after the last finished block")
    p.add_argument("--offload-cache", action="store_true",
                   help="layer-wise: keep the inter-block activation cache in CPU memory")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="layer-wise: compute dtype of the float weights and activations")


def layerwise_compile_args(args) -> tuple[str, dict]:
    """(checkpoint directory, compile() keyword arguments) of a --device compile."""
    import torch

    from ..frontends.models import resolve_tokenizer
    if not Path(args.model).is_dir():
        raise ConfigError(f"--device compiles a local checkpoint directory layer-wise; {args.model!r} "
                          "is not a directory")
    return args.model, {"device": args.device, "work_dir": args.work_dir,
                        "offload_cache": args.offload_cache, "dtype": getattr(torch, args.dtype),
                        "tokenizer": resolve_tokenizer(args.model)}


def cmd_plan(args) -> int:
    import torch

    from ..calibration.onload import CheckpointWeights, resolve_device
    from ..calibration.plan import Shape, check_fits, machine_capacity, plan_layerwise
    cfg = config_from_args(args)
    device = resolve_device(args.device or "auto")
    plan = plan_layerwise(Shape.from_checkpoint(args.model), cfg, device, getattr(torch, args.dtype),
                          args.offload_cache, CheckpointWeights(args.model).total_bytes())
    print(json.dumps(plan.to_dict(), indent=1) if args.json else "\n".join(plan.lines()))
    check_fits(plan, *machine_capacity(device, args.work_dir or "."))
    return 0


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="estimate peak GPU / CPU memory, disk and time of a layer-wise "
                       "compile (--device) before any work; exits 2 with the numbers when it cannot fit")
    add_compile_flags(p, dataset_required=False)
    for action in p._actions:   # the compile flags' --output: a plan writes nothing
        if action.dest == "output":
            action.required = False
    add_layerwise_flags(p)
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.set_defaults(func=cmd_plan)
