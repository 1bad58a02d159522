"""`sagequant` command line: calibrate, compile, eval, report, inspect, export, engine, demo."""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from ..config import ConfigError, QuantConfig
from ..errors import SageQuantError
from ..progress import is_quiet, log, set_quiet
from ..safe_write import check_output_dir, check_output_file
from .engine_cli import add_engine_parser
from .arg_types import (group_size, int_at_least, non_negative_float, non_negative_int, positive_float,
                        positive_int, unit_ratio)
from .demo import add_demo_args, run_from_args
from .compile_flags import add_compile_flags, config_from_args, print_report
from .layerwise_cli import add_layerwise_flags, add_plan_parser, layerwise_compile_args
from .qat_cli import add_qat_parser


# Errors a user can cause: every SageQuantError, and the operating system refusing a path the user
# named. Printed as one line; anything else is a bug in sagequant and keeps its traceback.
USER_ERRORS = (SageQuantError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def cmd_compile(args) -> int:
    from ..api import compile as sq_compile
    from ..calibration.data_sources import describe, load_dataset
    from ..frontends.models import resolve_model
    cfg = config_from_args(args)
    if not args.stop_after:  # fail before the (long) compile, not after it
        check_output_dir(args.output, args.overwrite, what="artifact")
    if args.dump_dir:
        check_output_dir(args.dump_dir, args.overwrite, what="IR dump")
    dataset = args.dataset or args.default_dataset
    data = None
    if dataset:
        print(f"calibration data: {describe(dataset)}"
              + ("" if args.dataset else " (the default; --dataset names another)"))
        data = load_dataset(dataset, args.text_field, cfg.calibration_seq_len)
    if args.device:
        model, options = layerwise_compile_args(args)
        cm = sq_compile(model, cfg, calibration_data=data, **options)
    else:
        model, tok = resolve_model(args.model)
        print_after = "all" if args.print_ir_after and "all" in args.print_ir_after else args.print_ir_after
        cm = sq_compile(model, cfg, calibration_data=data, tokenizer=tok, print_ir_after=print_after,
                        dump_dir=args.dump_dir, stop_after=args.stop_after, overwrite_dump=args.overwrite)
    cm.graph.model_info["source"] = args.model
    if args.stop_after and args.stop_after != cm.pipeline.names[-1]:
        print(f"stopped after pass {args.stop_after}; no artifact written")
        return 0
    path = cm.save(args.output, overwrite=args.overwrite)
    rep = cm.report()
    print_report(rep)
    print(f"artifact: {path}")
    _done(args, f"wrote {rep['scheme']} artifact {path} ({rep['quantized_layers']}/{rep['linear_layers']} "
                f"layers quantized, {rep['weight_bytes']['all_linear_ratio_vs_fp16']:.3f}x fp16 linear "
                f"bytes{_guard_summary(rep.get('accuracy_guard'))})")
    return 0


def _guard_summary(guard: dict | None) -> str:
    return f", guard KL {guard['kl']:.4g}" if guard and "kl" in guard else ""


def _done(args, what: str) -> None:
    """The one-line summary every command ends with (stderr; stdout keeps the results)."""
    log(f"sagequant {args.command}: {what} in {time.perf_counter() - args.started:.1f} s")


def cmd_eval(args) -> int:
    """Perplexity (with --artifact: paired KL / flip / Δppl against the float reference) or MMLU."""
    from ..api import load
    from ..frontends.models import model_source, resolve_model, resolve_tokenizer
    if bool(args.artifact) == bool(args.model):
        raise ConfigError("eval needs exactly one of --artifact DIR or --model MODEL")
    if args.task == "mmlu" and not args.mmlu_file:
        raise ConfigError("eval --task mmlu needs --mmlu-file PATH (jsonl: question, answer_a..answer_d, "
                          "correct_answer, topic)")
    reference = tok = None
    artifact = args.artifact or (args.model if model_source(args.model).kind == "artifact" else None)
    if artifact:
        cm = load(artifact)
        source = cm.graph.model_info.get("source")
        ref_spec = None if args.no_reference else (args.reference or source)
        if ref_spec is not None:
            reference, tok = resolve_model(ref_spec)
        if args.tokenizer or tok is None:
            if (args.tokenizer or source) is None:
                raise ConfigError("the artifact does not record its source model; pass --tokenizer MODEL "
                                  "(and --reference MODEL for the comparison with the float model)")
            tok = resolve_tokenizer(args.tokenizer or source)
        model_fn = cm
    else:
        model, tok = resolve_model(args.model)
        model_fn = _logits_fn(model)
    result = (_eval_mmlu if args.task == "mmlu" else _eval_perplexity)(args, model_fn, reference, tok)
    summary = _eval_summary(result)
    print(json.dumps(result, indent=1) if args.json else summary)
    _done(args, f"{summary.splitlines()[0]} of {args.artifact or args.model}")
    return 0


def _eval_summary(r: dict) -> str:
    if r["task"] == "mmlu":
        text = f"MMLU {r['shots']}-shot accuracy {100 * r['accuracy']:.2f}% on {r['questions']} questions"
        if "vs_float" in r:
            d = r["vs_float"]
            text += (f"\nfloat {100 * r['float']['accuracy']:.2f}%; delta {d['delta_points']:+.2f} ± "
                     f"{d['delta_points_se']:.2f} points (paired bootstrap), answers changed "
                     f"{100 * d['answers_changed']:.1f}%")
        return text
    if "vs_float" not in r:
        return (f"perplexity {r['ppl']:.4f} over {r['n_tokens_scored']} scored tokens "
                f"({r['n_windows']} windows of {r['window']}, stride {r['stride']})")
    v = r["vs_float"]
    text = (f"perplexity {v['ppl_quant']:.4f} (float {v['ppl_float']:.4f}, {v['ppl_delta_pct']:+.2f} ± "
            f"{v['ppl_delta_pct_se']:.2f}%) over {v['positions']} scored tokens ({v['windows']} windows of "
            f"{v['window']})\nKL(float || quant) {v['kl']:.5f} ± {v['kl_se']:.5f} nats/token; top-1 flips "
            f"{100 * v['flip_rate']:.2f} ± {100 * v['flip_rate_se']:.2f}%")
    if "contributions" in r:
        from ..evaluation.contributions import format_contributions
        text += "\n" + format_contributions(r["contributions"])
    return text


def _logits_fn(model):
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def _eval_perplexity(args, model_fn, reference, tok) -> dict:
    import torch

    from ..calibration.datasets import read_text_file
    from ..calibration.real_data import evaluation_text
    from ..evaluation.perplexity import compare_to_float, perplexity, tokenize_eval_text
    text = read_text_file(args.text, "--text evaluation") if args.text else evaluation_text()
    ids = tokenize_eval_text(tok, text, args.max_tokens)
    stride = args.stride or args.window
    if reference is not None:
        v = compare_to_float(_logits_fn(reference), model_fn, ids, window=args.window, stride=stride)
        out = {"task": "perplexity", "ppl": v["ppl_quant"], "n_tokens_scored": v["positions"],
               "n_windows": v["windows"], "window": v["window"], "stride": v["stride"],
               "max_tokens": v["max_tokens"], "vs_float": v}
        if args.contributions:
            out["contributions"] = _contributions(args, model_fn, reference, ids)
        return out
    if args.contributions:
        raise ConfigError("eval --contributions compares with the float model: give --artifact with a "
                          "reference (not --no-reference, not a float --model)")
    with torch.inference_mode():
        return {"task": "perplexity", **perplexity(model_fn, ids, window=args.window, stride=stride).to_dict()}


def _contributions(args, cm, reference, ids) -> dict:
    """The per-unit contribution table on the first --contribution-tokens evaluation tokens."""
    from ..evaluation.contributions import layer_contributions
    folded = [p["pass"] for p in cm.pass_history if p["pass"] in ("smoothquant", "awq") and p.get("modified")]
    if folded:
        raise ConfigError(f"eval --contributions: this artifact ran {', '.join(folded)}, whose fold scales "
                          "an artifact on disk does not carry (the float stand-ins would be wrong); "
                          "use layer_contributions on the CompiledModel that sq.compile returns")
    n = min(args.contribution_tokens, ids.numel())
    batches = [w[None] for w in ids[:n].split(args.window) if w.numel() >= 2]
    return layer_contributions(cm.graph, reference, batches, unit=args.contributions)


def _eval_mmlu(args, model_fn, reference, tok) -> dict:
    from ..evaluation.mmlu import accuracy, build_prompts, load_questions, paired_delta, predict
    prompts = build_prompts(load_questions(args.mmlu_file), shots=args.shots, per_topic=args.per_topic)
    preds = predict(model_fn, tok, prompts)
    out = {"task": "mmlu", "shots": args.shots, "file": str(args.mmlu_file), **accuracy(preds, prompts)}
    if reference is not None:
        float_preds = predict(_logits_fn(reference), tok, prompts)
        out["float"] = {k: v for k, v in accuracy(float_preds, prompts).items() if k != "per_topic"}
        out["vs_float"] = paired_delta(float_preds, preds, prompts)
    return out


def cmd_report(args) -> int:
    from ..api import load
    if args.html:
        from ..evaluation.html_report import is_sagequant_report, report_path
        check_output_file(report_path(args.html), args.overwrite, what="HTML report",
                          ours=is_sagequant_report)
    cm = load(args.artifact)
    rep = cm.report()
    if args.json:
        print(json.dumps(rep, indent=1, default=str))
    else:
        print_report(rep)
    if args.html:
        _html_report(cm, args)
    else:
        _done(args, f"report of {args.artifact}")
    return 0


def _html_report(cm, args) -> None:
    from ..evaluation.html_report import write_html_report
    reference = args.reference or cm.graph.model_info.get("source")
    accuracy = errors = None
    missing = None if reference else "the artifact records no source model; pass --reference MODEL"
    if reference:
        accuracy, errors = accuracy_and_errors(cm, reference, args.eval_tokens)
    if accuracy:
        print(f"accuracy: ppl {accuracy['float_ppl']:.3f} (float) -> {accuracy['quantized_ppl']:.3f} "
              f"({accuracy['delta_pct']:+.2f} ± {accuracy['ppl_delta_pct_se']:.2f}%), KL {accuracy['kl']:.4g} "
              f"± {accuracy['kl_se']:.2g}, top-1 flips {100 * accuracy['flip_rate']:.2f} ± "
              f"{100 * accuracy['flip_rate_se']:.2f}% on {accuracy['tokens']} tokens of {accuracy['text']}")
    else:
        print(f"accuracy: not measured ({missing or 'requested --eval-tokens 0'})")
    path = write_html_report(cm, args.html, accuracy, errors, missing, args.overwrite)
    print(f"HTML report: {path}")
    headline = f", ppl {accuracy['delta_pct']:+.2f}% vs float" if accuracy else ""
    _done(args, f"wrote {path}{headline}")


def accuracy_and_errors(cm, reference_spec: str, eval_tokens: int, error_tokens: int = 256):
    """(accuracy dict, per-layer error rows) measured against the float model `reference_spec`."""
    from ..calibration.datasets import tokenize_calibration
    from ..calibration.real_data import evaluation_text, wikipedia_prose
    from ..evaluation.perplexity import compare_to_float, tokenize_eval_text
    from ..frontends.models import resolve_model
    model, tok = resolve_model(reference_spec)
    errors = cm.error_report(tokenize_calibration(wikipedia_prose(), tok, 1, error_tokens),
                             reference=model)
    if eval_tokens <= 0:
        return None, errors
    ids = tokenize_eval_text(tok, evaluation_text(), eval_tokens)
    window = min(512, ids.numel())
    res = compare_to_float(lambda x: model(input_ids=x, use_cache=False).logits, cm, ids, window, window)
    return {"reference": str(reference_spec), "tokens": res["max_tokens"], "window": window,
            "text": "news (lee_background.cor)", "float_ppl": res["ppl_float"],
            "quantized_ppl": res["ppl_quant"], "delta_pct": res["ppl_delta_pct"],
            **{k: res[k] for k in ("ppl_delta_pct_se", "kl", "kl_se", "flip_rate", "flip_rate_se")}}, errors


def cmd_export(args) -> int:
    from ..api import load
    from ..backends.export import (check_args, check_output, checkpoint_parity, export,
                                   onnxruntime_session, parity)
    check_args(args.format, args.weight_format, args.engine)
    check_output(args.output, args.format, args.engine, args.overwrite)
    cm = load(args.artifact)
    checkpoint = args.format == "compressed-tensors"
    out = export(cm, args.output, format=args.format, weight_format=args.weight_format,
                 accuracy_level=args.accuracy_level, engine_path=args.engine, overwrite=args.overwrite)
    print(f"{args.format} export ({'checkpoint' if checkpoint else args.weight_format}) of "
          f"{cm.config.scheme}: {out}")
    if args.check:
        import torch
        vocab = int(cm.graph.model_info.get("vocab_size") or 2)
        ids = torch.randint(0, vocab, (1, args.check_tokens), generator=torch.Generator().manual_seed(0))
        if checkpoint:
            print("transformers (compressed-tensors) vs torch logits: "
                  + json.dumps(checkpoint_parity(cm, out, ids)))
        else:
            print("onnxruntime vs torch logits: " + json.dumps(parity(cm, onnxruntime_session(out), ids)))
    _done(args, f"wrote {args.format} export {out}")
    return 0


def cmd_inspect(args) -> int:
    """The annotated graph and, on request, Scheduler IR, per-layer errors and sensitivity; --json
    prints all of it as one JSON object instead."""
    from ..api import load
    cm = load(args.artifact)
    if args.pipeline and not args.json:
        print(cm.pipeline.describe() if cm.pipeline is not None else
              "this artifact does not record its pipeline (saved before pipelines were recorded)")
        return 0
    result: dict = {"layers": [cm.graph.annotation(n).to_dict() for n in cm.graph.annotated()]}
    if args.pipeline:
        result["pipeline"] = cm.pipeline.to_dict() if cm.pipeline is not None else None
    if args.scheduler_ir:
        result["scheduler_ir"] = cm.scheduler_ir
    if args.errors:
        from ..calibration.datasets import tokenize_calibration
        from ..calibration.real_data import wikipedia_prose
        model, tok = _reference(cm, args)
        ids = tokenize_calibration(wikipedia_prose(), tok, 1, args.error_tokens)
        result["errors"] = cm.error_report(ids, reference=model)
    if args.sensitivity:
        result["sensitivity"] = _sensitivity(cm, args)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        _print_inspection(cm, args, result)
    _done(args, f"inspected {args.artifact} ({len(result['layers'])} linear layers)")
    return 0


def _print_inspection(cm, args, result: dict) -> None:
    from ..calibration.sensitivity import format_sensitivity
    from ..evaluation.error_report import format_errors
    print(cm.graph.format(annotated_only=not args.all))
    if "scheduler_ir" in result:
        print(json.dumps(result["scheduler_ir"], indent=1))
    if "errors" in result:
        print(format_errors(result["errors"], top=args.top))
    if "sensitivity" in result:
        s = result["sensitivity"]
        print(f"float next-token loss {s['float_loss']:.4f} nats on {s['sequences']} x {s['tokens']} "
              f"tokens; delta loss ({s['method']}) of quantizing each layer alone, most sensitive first")
        print(format_sensitivity(s["rows"], top=args.top))


def _reference(cm, args):
    """(float model, tokenizer) the artifact is compared with: --reference or its recorded source."""
    from ..frontends.models import resolve_model
    source = args.reference or cm.graph.model_info.get("source")
    if source is None:
        raise ConfigError("the artifact does not record its source model; pass --reference MODEL")
    return resolve_model(source)


def _sensitivity(cm, args) -> dict:
    """Delta loss of quantizing each layer alone, at the artifact's scheme and upgrades."""
    from ..calibration.datasets import load_texts, tokenize_calibration
    from ..calibration.real_data import wikipedia_prose
    from ..passes.mixed_precision import model_sensitivity
    model, tok = _reference(cm, args)
    texts = wikipedia_prose() if args.text is None else load_texts(args.text)
    ids = tokenize_calibration(texts, tok, args.sensitivity_samples, args.error_tokens)
    cfg = cm.config.replace(overrides={}, target_bits_per_weight=None, target_max_delta_loss=None,
                            sensitivity_method=args.sensitivity_method or cm.config.sensitivity_method)
    base, rows = model_sensitivity(model, cfg, list(ids.split(1)))
    return {"float_loss": base, "sequences": ids.shape[0], "tokens": ids.shape[1],
            "method": cfg.sensitivity_method, "rows": rows}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sagequant", description="quantization compiler for LLMs")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="calibrate on a dataset and write a quantized artifact")
    add_compile_flags(c, dataset_required=False, default_dataset="wikipedia")
    add_layerwise_flags(c)
    c.set_defaults(func=cmd_compile)
    c = sub.add_parser("compile", help="compile a model (calibration data optional for weight-only schemes)")
    add_compile_flags(c, dataset_required=False)
    add_layerwise_flags(c)
    c.set_defaults(func=cmd_compile)
    add_plan_parser(sub)
    e = sub.add_parser("eval", help="perplexity (with KL / flips vs the float model) or MMLU accuracy "
                       "of an artifact or a float model")
    e.add_argument("--artifact")
    e.add_argument("--model", help="a float model (smollm2, checkpoint dir, .gguf) or an artifact dir")
    e.add_argument("--task", choices=["perplexity", "mmlu"], default="perplexity")
    e.add_argument("--mmlu-file", help="MMLU jsonl (question, answer_a..answer_d, correct_answer, topic)")
    e.add_argument("--shots", type=non_negative_int, default=0,
                   help="MMLU solved examples per prompt, the first of each topic (0 or 5 usually)")
    e.add_argument("--per-topic", type=positive_int, help="score at most this many MMLU questions per subject")
    e.add_argument("--reference", help="float model an artifact is compared with (default: its source)")
    e.add_argument("--no-reference", action="store_true",
                   help="evaluate the artifact alone, without the float model's numbers")
    e.add_argument("--tokenizer", help="model whose tokenizer to use (default: the reference's or the "
                   "artifact's source)")
    e.add_argument("--text", help="evaluation text file (default: the packaged news text)")
    e.add_argument("--max-tokens", type=int_at_least(2), default=20000, help="evaluation tokens")
    e.add_argument("--window", type=int_at_least(2), default=512, help="tokens per perplexity window")
    e.add_argument("--stride", type=positive_int, help="tokens between windows (default: --window)")
    e.add_argument("--contributions", choices=["block", "linear"],
                   help="also the per-block (or per-linear) contribution table: KL / NLL change when only "
                   "that unit is quantized, next to its worst per-layer SQNR")
    e.add_argument("--contribution-tokens", type=int_at_least(2), default=1024,
                   help="evaluation tokens the contribution table is measured on (one forward per unit)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("report", help="print an artifact's report")
    r.add_argument("--artifact", required=True)
    r.add_argument("--json", action="store_true")
    r.add_argument("--html", metavar="DIR", help="write DIR/report.html with accuracy, memory, kernels "
                   "and plots (per-layer error, activation ranges vs clip, weight bytes)")
    r.add_argument("--reference", help="float model for accuracy and per-layer error (default: the "
                   "artifact's source)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing --html file that is not an earlier sagequant report")
    r.add_argument("--eval-tokens", type=non_negative_int, default=2048,
                   help="news-text tokens for float vs quantized perplexity (0: skip)")
    r.set_defaults(func=cmd_report)
    i = sub.add_parser("inspect", help="print an artifact's graph with quantization annotations")
    i.add_argument("--artifact", required=True)
    i.add_argument("--all", action="store_true", help="every node, not only annotated ones")
    i.add_argument("--pipeline", action="store_true",
                   help="print the pipeline the compile ran (passes, options, and those left out with why)")
    i.add_argument("--json", action="store_true", help="print the annotations (and what else is asked "
                   "for) as one JSON object")
    i.add_argument("--scheduler-ir", action="store_true", help="also print the Scheduler IR JSON")
    i.add_argument("--errors", action="store_true",
                   help="per-layer SQNR of quantized outputs vs the float model, worst first")
    i.add_argument("--reference", help="float model for --errors (default: the artifact's source)")
    i.add_argument("--error-tokens", type=int_at_least(2), default=256, help="tokens of Wikipedia prose to measure on")
    i.add_argument("--top", type=positive_int, help="print only the worst N layers")
    i.add_argument("--sensitivity", action="store_true",
                   help="delta loss of quantizing each linear alone (scheme and precision_upgrades "
                        "of the artifact's config), most sensitive first")
    i.add_argument("--sensitivity-samples", type=positive_int, default=2, help="sequences to measure on")
    i.add_argument("--sensitivity-method", choices=["measured", "fisher"],
                   help="measured: one forward per layer and option; fisher: one backward per sequence "
                        "(default: the artifact's QuantConfig.sensitivity_method)")
    i.add_argument("--text", help="text file for --sensitivity (default: the packaged Wikipedia prose)")
    i.set_defaults(func=cmd_inspect)
    x = sub.add_parser("export", help="write an artifact as ONNX (QDQ / MatMulNBits), TensorRT ONNX "
                       "or a compressed-tensors checkpoint")
    x.add_argument("--artifact", required=True)
    x.add_argument("--format", default="onnx", help="onnx | tensorrt | compressed-tensors")
    x.add_argument("--output", required=True, help="the .onnx file (or checkpoint directory) to write")
    x.add_argument("--weight-format", default="qdq", help="qdq | matmulnbits (format onnx)")
    x.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=0,
                   help="MatMulNBits accuracy_level: 0 float accumulation (default), 4 int8 activations")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output / --engine file (or write into a checkpoint "
                   "directory holding other files; only sagequant's own are replaced)")
    x.add_argument("--engine", help="also build a TensorRT engine here (needs tensorrt and a GPU)")
    x.add_argument("--check", action="store_true",
                   help="run the export (onnxruntime, or transformers for a checkpoint) and print its "
                   "logit difference to the torch path")
    x.add_argument("--check-tokens", type=int_at_least(2), default=32)
    x.set_defaults(func=cmd_export)
    add_engine_parser(sub)
    d = sub.add_parser("demo", help="compile the real SmolLM2 (or --model) at W8A16 and W4A16 and print "
                       "the report table")
    add_demo_args(d)
    d.set_defaults(func=run_from_args)
    add_qat_parser(sub, add_compile_flags)
    _add_quiet_flag(p)
    return p


def _add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    """--quiet on every command (progress displays and log lines off; results still printed)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        parser.add_argument("--quiet", "-q", action="store_true",
                            help="no progress displays or log lines on stderr")
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            _add_quiet_flag(child)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.started = time.perf_counter()
    was_quiet = is_quiet()
    set_quiet(was_quiet or args.quiet)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"sagequant {args.command}: error: {e}", file=sys.stderr)
        for note in getattr(e, "__notes__", []):
            print(f"  {note}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - not a user error: show everything needed to fix it
        traceback.print_exc()
        print(f"sagequant {args.command}: internal error: this is a bug in sagequant, not in your "
              "input; please report it with the traceback above", file=sys.stderr)
        return 1
    finally:
        set_quiet(was_quiet)


if __name__ == "__main__":
    sys.exit(main())
