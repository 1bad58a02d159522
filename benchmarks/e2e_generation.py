"""End-to-end generation on one GPU (issue 5 item 3): bf16 vs W8A16, W4A16 (g128), W8A8-FP8 and
W8A8-INT8, every model compiled by `sagequant.compile(..., QuantConfig(backend="cuda"))` with RTN
(no calibration data) and run by the same GenerationEngine (paged bf16 KV, CUDA-graph decode).

  e2e          per scheme: prefill latency (batch 1, --prefill-len tokens), decode tokens/s at each
               --batches (--prompt-len prompts, up to --new-tokens new tokens each), the linear
               weights' bytes as stored, each as a ratio to bf16 measured in the same run.
  correctness  a tiny Llama: logits of the CUDA-compiled model run on the GPU (prefill of 300
               tokens, then one decode step: the large-M and the M=1 kernel paths) vs the same
               RTN model compiled for backend cpu run on CPU by the reference kernels.

Model: Llama-3-8B (default) or Qwen2-7B layer shapes with random weights built here, on the
device that runs it, and compiled there (nothing is downloaded), truncated to --layers decoder layers, vocab --vocab (32000 by default, not the real
128256 / 152064, so the bf16 lm_head does not dominate a 4-layer model). Decode cost is per layer
plus the embedding/lm_head; the JSON records the lm_head share and an estimate for the full depth:
    full_ms = head_ms + (gpu_step_ms - head_ms) * full_layers / layers + host_ms
with gpu_step_ms the decode graph's replay time, head_ms the bf16 lm_head GEMM alone (every
scheme keeps lm_head bf16) and host_ms the engine's per-step host time (sampling, bookkeeping).

    python3 benchmarks/e2e_generation.py --out "$OUT/e2e.json"   # one H100, < 9 min
    python3 benchmarks/e2e_generation.py --smoke                 # CPU, tiny shapes, backend cpu

Needs transformers and sagequant's dependencies importable (a bare checkout is imported as the
`sagequant` package). --budget-s (420 s) is a deadline for the e2e rows, --correctness-s (60 s)
more for the correctness part: rows past it are recorded as skipped and the results are still
written (JSON and a Markdown twin) after every scheme; decode rows stop early, recording the new
tokens that ran. A row bound to a non-CUDA kernel, or whose engine graph calls a CPU reference
linear, is refused (an error row, never timed); any error row or correctness FAIL exits 1.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cuda_bench_lib as lib  # noqa: E402
import prefill_report  # noqa: E402

SHAPES = {  # hidden, MLP, heads, kv heads; full_layers is the real model's depth
    "llama3-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, full_layers=32),
    "qwen2-7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                     num_key_value_heads=4, full_layers=28),
    "tiny": dict(arch="llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, full_layers=2),
}
SCHEMES = {  # RTN: minmax weight scales, no calibration data (dynamic per-token activations)
    "bf16": dict(ignore=["*"]),
    "W8A16": dict(weight_dtype="int8", group_size=None),
    "W4A16": dict(weight_dtype="int4", group_size=128),
    # lm_head in int8 per channel: at 8B, 1.05 of the 4.6 GB a W4A16 decode step reads is lm_head
    "W4A16-LM8": dict(weight_dtype="int4", group_size=128, ignore=[],
                      overrides={"lm_head": {"weight_dtype": "int8", "group_size": None}}),
    "W8A8-FP8": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None),
    "W8A8-INT8": dict(weight_dtype="int8", activation_dtype="int8", group_size=None),
}
# Rel. Frobenius error of logits, GPU kernels vs CPU reference kernels, both bf16: accumulation
# order differs (~3e-3 per GEMM measured on the H100); FP8 activations add code flips where bf16
# inputs differ by one ulp near a rounding boundary (an e4m3 step is 6-12% of the value).
CORRECTNESS_TOL = {"W8A8-FP8": 5e-2}
DEFAULT_TOL = 2e-2
CORRECTNESS_PROMPT = 300
SKIPPED = "skipped (time budget)"


def import_sagequant():
    """The installed sagequant, else the `sagequant/` package folder of this checkout."""
    if importlib.util.find_spec("sagequant") is None:
        sys.path.insert(0, str(HERE.parent))
    import sagequant
    return sagequant


def build_model(shape: str, layers: int, vocab: int, max_positions: int, dtype, device="cpu"):
    import transformers as tf
    s = dict(SHAPES[shape])
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[s.pop("arch")]
    s.pop("full_layers")
    cfg = cls[0](num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=max_positions,
                 tie_word_embeddings=False, **s)
    torch.manual_seed(0)
    # Built where it runs and compiled in place (on a GPU: seconds at 8B, where a CPU build and
    # compile took minutes); never moved afterwards (a GPU-built model moved to CPU keeps GPU
    # tensors in HF's rotary attributes, which torch.export then sees). Initialised in `dtype`
    # directly: at 8B an fp32 init is 32 GB. peer_generate.py builds the same weights the same way.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else default)
    try:
        with torch.device(device):
            return cls[1](cfg).to(dtype).eval()
    finally:
        torch.set_default_dtype(default)


def compile_scheme(sq, model, scheme: str, backend: str):
    # guard off: RTN without calibration data has nothing held back to measure the guard on.
    cfg = sq.QuantConfig(backend=backend, guard="off", **SCHEMES[scheme])
    return sq.compile(model, cfg)


def linear_ops(graph) -> dict[str, int]:
    """Counts of the sagequant ops the graph calls (the linears' kernels among them)."""
    out: dict[str, int] = {}
    for n in graph.graph.nodes:
        name = str(n.target)
        if n.op == "call_function" and name.startswith("sagequant."):
            out[name] = out.get(name, 0) + 1
    return out


def check_kernels(cm, engine_graph, scheme: str, backend: str) -> dict:
    """Every quantized linear must be bound to a `backend` kernel without fallback, and (on cuda)
    the graph the engine runs must call no CPU reference linear: a timing of the reference path
    would be meaningless, so this raises instead."""
    bindings = cm.kernel_bindings
    kernels: dict[str, int] = {}
    for layer, b in bindings.items():
        kernels[f"{b['backend']}:{b['kernel']}"] = kernels.get(f"{b['backend']}:{b['kernel']}", 0) + 1
        if b["backend"] != backend or b["fallback_from"]:
            raise SystemExit(f"{scheme}: layer {layer} is bound to {b['backend']}:{b['kernel']} "
                             f"(fallback_from={b['fallback_from']}); expected a {backend} kernel")
    ops = linear_ops(engine_graph)
    if scheme != "bf16" and not bindings:
        raise SystemExit(f"{scheme}: no linear was quantized (kernel bindings are empty)")
    if backend == "cuda":
        # The engine's graph may merge linears that read one input (q/k/v, gate/up): count the
        # bound layers' ops in the compiled graph, and refuse any reference op in either.
        compiled_ops = linear_ops(cm.graph)
        ref = {k: v for k, v in {**compiled_ops, **ops}.items() if k.endswith("_ref.default")}
        cuda = sum(v for k, v in compiled_ops.items() if ".cuda_" in k and "linear" in k)
        if ref or cuda != len(bindings):
            raise SystemExit(f"{scheme}: the engine graph calls reference ops {ref} and {cuda} CUDA "
                             f"linear ops for {len(bindings)} bound layers; refusing to time it")
    return {"kernels": kernels, "graph_ops": ops,
            "dispatch_by_m": next((b["attrs"].get("dispatch_by_m") for b in bindings.values()
                                   if "dispatch_by_m" in b["attrs"]), None)}


def weight_memory(cm, engine_graph) -> dict:
    """Linear weights as stored (scales and zeros included; kept layers, lm_head among them, in
    bf16) and every tensor the engine's graph holds (embedding and norms too)."""
    wb = cm.weight_bytes()
    storages = {}
    for t in engine_graph.state().values():
        if isinstance(t, torch.Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return {"linear_bytes": wb["all_linear_bytes"], "decoder_quantized_bytes": wb["quantized_layers_bytes"],
            "bits_per_weight": wb["bits_per_weight"], "resident_bytes": sum(storages.values())}


def new_engine(cm, max_batch: int, max_seq_len: int, device, cuda_graphs: bool,
               fused_step: bool = True, measure_kernels: bool | None = None,
               prefill_graphs: bool | None = None, overlap_decode: bool | None = None):
    from sagequant.runtime import GenerationEngine
    blocks = max_batch * math.ceil((max_seq_len + 1) / cm.config.kv_block_size)
    # merge_linears: q|k|v and gate|up as one GEMM each also where the weights already are (a
    # model compiled in place on the GPU), as they are when the engine copies them there.
    return GenerationEngine(cm, max_batch=max_batch, max_seq_len=max_seq_len, device=device,
                            cuda_graphs=cuda_graphs, num_kv_blocks=blocks, fused_step=fused_step,
                            merge_linears=fused_step, measure_kernels=measure_kernels,
                            prefill_graphs=prefill_graphs, overlap_decode=overlap_decode)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def prefill_ms(engine, length: int, vocab: int, device, reps: int) -> dict:
    """One request of `length` tokens and max_new_tokens=1: a step is its prefill plus one argmax.
    The first run compiles the kernels for this M and is not counted."""
    times = []
    for i in range(reps + 1):
        engine.add_request(prompts(1, length, vocab, 10 + i)[0], 1)
        lib.sync()
        t0 = time.perf_counter()
        engine.step()
        lib.sync()
        times.append((time.perf_counter() - t0) * 1e3)
        assert not engine.has_work()
    return {f"prefill_ms_{length}": statistics.median(times[1:]), "prefill_reps": reps}


def logits_vs_float(engine, model, vocab: int, device, length: int = 128) -> dict:
    """One prefill through the engine vs the float model's own forward on the same ids: the
    scheme's whole error (quantization + kernels; bf16: kernel rounding alone)."""
    length = min(length, engine.max_seq_len)
    ids = torch.tensor(prompts(1, length, vocab, 99), device=device)
    with torch.inference_mode():
        ref = model(ids).logits[0].double()
        engine.pool.open(0, length)
        got = engine.forward([0], ids)[0].double()
        engine.pool.free(0)
    return {"rel_fro": lib.rel_errors(got.cpu(), ref.cpu())["rel_fro"],
            "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
            "positions": length}


def decode_rate(engine, batch: int, prompt_len: int, new_tokens: int, vocab: int, device,
                stop_at: float, profile: bool = False) -> dict:
    """Prefill `batch` prompts, run two decode steps (graph capture), then time decode steps until
    done or `stop_at`; on a GPU also the captured step's replay alone (no host work)."""
    rids = [engine.add_request(p, new_tokens) for p in prompts(batch, prompt_len, vocab, batch)]
    before = engine.tokens_generated
    engine.step()
    engine.step()
    lib.sync()
    # Decode steps run, not step() calls: an overlapped engine's last call only reads tokens.
    calls, launched = 0, engine.graphs.launches if engine.graphs else 0
    t0 = time.perf_counter()
    while engine.has_work() and time.perf_counter() < stop_at:
        engine.step()
        calls += 1
    lib.sync()
    dt = time.perf_counter() - t0
    steps = engine.graphs.launches - launched if engine.graphs else calls
    row_tokens = engine.tokens_generated
    for rid in rids:
        engine.abort(rid)
    row = {"tok_s": batch * steps / dt if steps else None, "ms_per_step": 1e3 * dt / max(steps, 1),
           "timed_steps": steps, "new_tokens_run": (row_tokens - before) // batch}
    graphs = engine.graphs
    bucket = graphs.buckets.get(next(s for s in graphs.sizes if s >= batch)) if graphs else None
    if bucket is not None and bucket.graph is not None:
        # Replaying after the requests ended rewrites the last step's cache entries: harmless.
        row["gpu_step_ms"] = replay_ms(bucket.graph)
        if profile:   # per-kernel breakdown of this step (torch.profiler over graph replays)
            from engine_step_profile import profile_graph
            try:
                row["profile"] = profile_graph(bucket.graph)
            except Exception as err:  # the timings above still stand
                row["profile"] = {"error": lib.short_error(err)}
    return row


def replay_ms(graph, reps: int = 20) -> float:
    """Median over 3 runs of `reps` back-to-back replays of a captured CUDA graph, ms per replay."""
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            graph.replay()
        e.record()
        torch.cuda.synchronize()
        samples.append(s.elapsed_time(e) / reps)
    return statistics.median(samples)


def head_ms(model, batches, device) -> dict:
    """The bf16 lm_head GEMM alone at M = batch (CUDA-graph timing), for the full-depth estimate."""
    if device.type != "cuda":
        return {}
    w = model.lm_head.weight.detach().to(device)
    out = {}
    for b in batches:
        x = torch.randn(b, w.shape[1], device=device, dtype=w.dtype)
        out[b] = lib.time_graph([lambda x=x: torch.nn.functional.linear(x, w)])["us"] / 1e3
    del w
    return out


def run_scheme(sq, model, scheme, args, backend, device, deadline, vocab, schemes_after: int) -> dict:
    """Compile, check the kernels, then time prefill and decode rows; decode rows share the time
    left fairly with the `schemes_after` schemes still to run."""
    row: dict = {"scheme": scheme}
    t0 = time.perf_counter()
    cm = compile_scheme(sq, model, scheme, backend)
    row["compile_s"] = time.perf_counter() - t0
    print(f"{scheme}: compiled in {row['compile_s']:.0f} s", flush=True)  # a cut run shows how far it got
    max_seq = max(*args.prefill_len, args.prompt_len + args.new_tokens) + 1
    t0 = time.perf_counter()
    try:
        engine = new_engine(cm, max(args.batches, default=1), max_seq, device,
                            cuda_graphs=device.type == "cuda", fused_step=not args.unfused,
                            prefill_graphs=False if args.eager_prefill else None,
                            overlap_decode=False if args.sync_decode else None)
    except Exception as e:  # recorded: the row then times the M thresholds' paths
        row["measure_kernels_error"] = lib.short_error(e)
        engine = new_engine(cm, max(args.batches, default=1), max_seq, device,
                            cuda_graphs=device.type == "cuda", fused_step=not args.unfused,
                            measure_kernels=False, prefill_graphs=False if args.eager_prefill else None,
                            overlap_decode=False if args.sync_decode else None)
    row["engine_build_s"] = time.perf_counter() - t0
    row.update(check_kernels(cm, engine.graph, scheme, backend))
    row["memory"] = weight_memory(cm, engine.graph)
    if args.check_logits:
        row["logits_vs_float"] = logits_vs_float(engine, model, vocab, device)
    if engine.kernel_choices:
        row["kernel_choices"] = prefill_report.choices_summary(engine)
    for length in args.prefill_len:
        if time.perf_counter() < deadline:
            row.update(prefill_ms(engine, length, vocab, device, args.prefill_reps))
            if args.profile_prefill and device.type == "cuda":
                row[f"prefill_profile_{length}"] = prefill_report.profile_prefill(
                    engine, prompts(1, length, vocab, 77)[0])
        else:
            row[f"prefill_ms_{length}"] = SKIPPED
    if engine.prefill_graphs is not None:   # per 128-token bucket: capture time, pool growth
        row["prefill_graph_captures"] = dict(engine.prefill_graphs.captures)
    for i, b in enumerate(args.batches):
        left = deadline - time.perf_counter()
        if left <= 0:
            row[f"decode_b{b}"] = SKIPPED
            continue
        stop_at = time.perf_counter() + left / (len(args.batches) * (1 + schemes_after) - i)
        row[f"decode_b{b}"] = decode_rate(engine, b, args.prompt_len, args.new_tokens, vocab, device,
                                          stop_at, profile=b in args.profile_batches)
    del engine, cm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(json.dumps(row, default=str), flush=True)
    return row


def long_context_rows(cm, args, device, vocab: int, deadline: float) -> dict:
    """Batch-1 decode after an --long-context prompt, per KV cache dtype (same weights)."""
    from sagequant.api import CompiledModel
    from sagequant.ir.kv_plan import build_kv_plan
    out = {}
    for kv in args.long_kv:
        if time.perf_counter() > deadline:
            out[kv] = SKIPPED
            continue
        cfg = cm.config.replace(kv_cache_dtype=kv)
        cm_kv = CompiledModel(cm.graph, cfg, build_kv_plan(cfg), cm.pass_history)
        engine = new_engine(cm_kv, 1, args.long_context + 64, device, device.type == "cuda",
                            fused_step=not args.unfused)
        stop = min(deadline, time.perf_counter() + 30)
        out[kv] = decode_rate(engine, 1, args.long_context, 32, vocab, device, stop)
        del engine, cm_kv
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = out.get("none")
    for kv, r in out.items():
        if isinstance(r, dict) and isinstance(base, dict) and r["tok_s"] and base["tok_s"]:
            r["speedup_vs_bf16_kv"] = r["tok_s"] / base["tok_s"]
    return out


def add_ratios(rows: list[dict], batches) -> None:
    """Each scheme over bf16 of the same run: speed-ups (> 1 faster) and the bytes ratio."""
    base = next((r for r in rows if r["scheme"] == "bf16" and "memory" in r), None)
    if base is None:
        return
    num = lambda v: v if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # noqa: E731
    for r in rows:
        if "memory" in r:
            r["linear_bytes_vs_bf16"] = r["memory"]["linear_bytes"] / base["memory"]["linear_bytes"]
        for key in [k for k in r if k.startswith("prefill_ms_")]:
            if num(r.get(key)) and num(base.get(key)):
                r[key.replace("_ms_", "_speedup_")] = base[key] / r[key]
        for b in batches:
            mine, ref = r.get(f"decode_b{b}"), base.get(f"decode_b{b}")
            if isinstance(mine, dict) and isinstance(ref, dict) and mine["tok_s"] and ref["tok_s"]:
                mine["speedup"] = mine["tok_s"] / ref["tok_s"]
                if "gpu_step_ms" in mine and "gpu_step_ms" in ref:
                    mine["gpu_step_speedup"] = ref["gpu_step_ms"] / mine["gpu_step_ms"]


def full_depth(rows, heads: dict, layers: int, full_layers: int, batches) -> None:
    """The estimate in the module docstring, per scheme and batch (GPU runs only)."""
    for r in rows:
        for b in batches:
            d = r.get(f"decode_b{b}")
            if not (isinstance(d, dict) and "gpu_step_ms" in d and b in heads and d["tok_s"]):
                continue
            host = max(0.0, d["ms_per_step"] - d["gpu_step_ms"])
            ms = heads[b] + (d["gpu_step_ms"] - heads[b]) * full_layers / layers + host
            d["est_full_depth_tok_s"] = b / ms * 1e3
    base = next((r for r in rows if r["scheme"] == "bf16"), None)
    for r in rows:
        for b in batches:
            d, ref = r.get(f"decode_b{b}"), (base or {}).get(f"decode_b{b}")
            if isinstance(d, dict) and isinstance(ref, dict) and "est_full_depth_tok_s" in d \
                    and "est_full_depth_tok_s" in ref:
                d["est_full_depth_speedup"] = d["est_full_depth_tok_s"] / ref["est_full_depth_tok_s"]


def correctness(sq, backend: str, device, dtype, deadline) -> list[dict]:
    """Tiny Llama, each quantized scheme: the `backend` kernels on `device` through the engine
    (prefill, then one decode step) vs the cpu-compiled model called on CPU (reference kernels);
    the float model's distance to the reference says how large quantization itself is."""
    model = build_model("tiny", 2, 512, 512, dtype)
    ids = torch.tensor(prompts(1, CORRECTNESS_PROMPT + 1, 512, 7))
    with torch.inference_mode():
        float_logits = model(ids).logits.double()
    out = []
    for scheme in [s for s in SCHEMES if s != "bf16"]:
        if time.perf_counter() > deadline:
            out.append({"scheme": scheme, "status": SKIPPED})
            continue
        cpu = compile_scheme(sq, model, scheme, "cpu")
        ref = cpu(ids).double()
        cm = cpu if backend == "cpu" else compile_scheme(sq, model, scheme, backend)
        engine = new_engine(cm, 1, ids.shape[1], device, cuda_graphs=False)
        check_kernels(cm, engine.graph, scheme, backend)
        engine.pool.open(0, ids.shape[1])
        with torch.inference_mode():
            pre = engine.forward([0], ids[:, :-1].to(device))
            dec = engine.forward([0], ids[:, -1:].to(device))
        got = torch.cat([pre, dec], dim=1).double().cpu()
        err, step_err = lib.rel_errors(got, ref), lib.rel_errors(got[:, -1:], ref[:, -1:])
        row = {"scheme": scheme, "kernels": sorted(cm.report()["kernels"]), "rel_fro": err["rel_fro"],
               "decode_step_rel_fro": step_err["rel_fro"], "finite": err["finite"],
               "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
               "quantization_rel_fro": lib.rel_errors(ref, float_logits)["rel_fro"]}
        worst = max(row["rel_fro"], row["decode_step_rel_fro"])
        row["tolerance"] = CORRECTNESS_TOL.get(scheme, DEFAULT_TOL)
        row["status"] = "ok" if err["finite"] and worst <= row["tolerance"] else "FAIL"
        print(json.dumps(row), flush=True)
        out.append(row)
        del engine, cm, cpu
    return out


def markdown(result: dict) -> str:
    rows, batches = result.get("e2e", []), result["settings"]["batches"]
    def f(v, digits=3):
        return f"{v:.{digits}g}" if isinstance(v, (int, float)) else ("" if v is None else str(v))
    head = ["scheme", "linear weights MiB", "× bf16"]
    for length in result["settings"]["prefill_len"]:
        head += [f"prefill {length} ms", "speed-up"]
    for b in batches:
        head += [f"decode b{b} tok/s", "speed-up", "GPU step speed-up", "est. full-depth speed-up"]
    table = []
    for r in rows:
        mib = r["memory"]["linear_bytes"] / 2**20 if "memory" in r else r.get("status")
        line = [r["scheme"], f(mib, 4), f(r.get("linear_bytes_vs_bf16"))]
        for length in result["settings"]["prefill_len"]:
            line += [f(r.get(f"prefill_ms_{length}")), f(r.get(f"prefill_speedup_{length}"))]
        for b in batches:
            d = r.get(f"decode_b{b}")
            d = d if isinstance(d, dict) else {"tok_s": d}
            line += [f(d.get("tok_s"), 4), f(d.get("speedup")), f(d.get("gpu_step_speedup")),
                     f(d.get("est_full_depth_speedup"))]
        table.append(line)
    st, share = result["settings"], result.get("lm_head_share_bf16", {})
    ran = {r["scheme"]: {b: r[f"decode_b{b}"].get("new_tokens_run") for b in batches
                         if isinstance(r.get(f"decode_b{b}"), dict)} for r in rows}
    text = [f"{st['shape']} shapes, {st['layers']} of {st['full_layers']} layers, vocab {st['vocab']}, "
            f"random weights, {st['dtype']} activations, backend {st['backend']}, RTN; lm_head kept bf16 = "
            f"{f(share.get('at_layers'))} of the bf16 linear bytes here, "
            f"{f(share.get('at_full_depth'))} at full depth. Decode: {st['prompt_len']}-token prompts, "
            f"new tokens run per batch: {ran}.",
            lib.markdown_table(head, table)]
    long_rows = [(r["scheme"], kv, d) for r in rows for kv, d in (r.get("long_context") or {}).items()]
    if long_rows:
        text.append(lib.markdown_table(
            ["scheme", f"KV dtype ({st.get('long_context')}-token context, batch 1)", "decode tok/s",
             "× bf16 KV", "GPU step ms"],
            [[sch, kv, f(d.get("tok_s") if isinstance(d, dict) else d, 4),
              f(d.get("speedup_vs_bf16_kv")) if isinstance(d, dict) else "",
              f(d.get("gpu_step_ms")) if isinstance(d, dict) else ""] for sch, kv, d in long_rows]))
    checks = [(r["scheme"], r["logits_vs_float"]) for r in rows if "logits_vs_float" in r]
    if checks:
        text.append(lib.markdown_table(
            ["scheme", "prefill logits rel_fro vs the float model", "argmax agreement", "positions"],
            [[sch, f(c["rel_fro"]), f(c["argmax_agreement"]), c["positions"]] for sch, c in checks]))
    profiled = [(r["scheme"], b, r[f"decode_b{b}"]["profile"]) for r in rows for b in batches
                if isinstance(r.get(f"decode_b{b}"), dict) and "by_category" in r[f"decode_b{b}"].get("profile", {})]
    if profiled:
        cats = sorted({c for *_, p in profiled for c in p["by_category"]})
        text.append("Decode step by kernel category, µs per step (kernels per step):\n\n" + lib.markdown_table(
            ["scheme", "batch", "kernel µs", "kernels"] + cats,
            [[sch, b, f(p["kernel_us"], 4), f(p["kernels_per_step"], 4)]
             + [f"{p['by_category'].get(c, {}).get('us', 0):.0f} ({p['by_category'].get(c, {}).get('kernels', 0):.0f})"
                for c in cats] for sch, b, p in profiled]))
    text += prefill_report.markdown(rows, result["settings"]["prefill_len"])
    if result.get("correctness"):
        text.append(lib.markdown_table(
            ["scheme", "status", "logits rel_fro vs CPU ref", "decode step rel_fro", "tolerance",
             "argmax agree", "quantization rel_fro (ref vs float)", "kernels"],
            [[c["scheme"], c["status"], f(c.get("rel_fro")), f(c.get("decode_step_rel_fro")),
              f(c.get("tolerance")), f(c.get("argmax_agreement")), f(c.get("quantization_rel_fro")),
              ", ".join(c.get("kernels", []))]
             for c in result["correctness"]]))
    return "\n\n".join(text)


def e2e(sq, args, settings, backend, device, dtype, deadline, result: dict, save) -> int:
    """The e2e rows into result["e2e"] (saved after each scheme); 1 if any scheme errored."""
    positions = max(*args.prefill_len, args.long_context or 0, args.prompt_len + args.new_tokens) + 64
    t0 = time.perf_counter()
    model = build_model(settings["shape"], args.layers, args.vocab, positions, dtype, device)
    print(f"model built in {time.perf_counter() - t0:.0f} s", flush=True)
    lm_head = model.lm_head.weight.numel() * 2
    decoder = sum(p.numel() * 2 for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    full_decoder = decoder * settings["full_layers"] / args.layers
    result["lm_head_share_bf16"] = {"at_layers": lm_head / (lm_head + decoder),
                                    "at_full_depth": lm_head / (lm_head + full_decoder)}
    result["e2e"], status = [], 0
    for i, scheme in enumerate(args.schemes):
        if time.perf_counter() > deadline:
            result["e2e"].append({"scheme": scheme, "status": SKIPPED})
            continue
        try:
            row = run_scheme(sq, model, scheme, args, backend, device, deadline, args.vocab,
                             len(args.schemes) - 1 - i)
        except (Exception, SystemExit) as e:  # recorded and the exit status set; later schemes still run
            row, status = {"scheme": scheme, "status": f"error: {lib.short_error(e)}"}, 1
            print(row["status"], flush=True)
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
        result["e2e"].append(row)
        add_ratios(result["e2e"], args.batches)
        save()
    for scheme in args.long_schemes if args.long_context else []:   # after every scheme's rows
        row = next((r for r in result["e2e"] if r["scheme"] == scheme and "memory" in r), None)
        if row is None:
            continue
        try:
            row["long_context"] = long_context_rows(compile_scheme(sq, model, scheme, backend), args,
                                                    device, args.vocab, deadline)
        except (Exception, SystemExit) as e:
            row["long_context"], status = {"error": lib.short_error(e)}, 1
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        save()
    heads = head_ms(model, args.batches, device)
    result["lm_head_ms"] = heads
    full_depth(result["e2e"], heads, args.layers, settings["full_layers"], args.batches)
    save()
    return status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, backend cpu")
    ap.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="llama3-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES),
                    help="e2e rows to run; none (bare --schemes) runs only the correctness part")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--prefill-len", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--unfused", action="store_true",
                    help="run the exported ATen step (GenerationEngine fused_step=False)")
    ap.add_argument("--long-context", type=int, default=0,
                    help="also decode at batch 1 after a prompt of this many tokens, per --long-kv")
    ap.add_argument("--long-kv", nargs="*", default=["none", "fp8", "int8"])
    ap.add_argument("--long-schemes", nargs="*", default=["bf16"], choices=list(SCHEMES))
    ap.add_argument("--profile-batches", type=int, nargs="*", default=[],
                    help="per-kernel breakdown of the decode step at these batches (torch.profiler)")
    ap.add_argument("--eager-prefill", action="store_true",
                    help="prefill eagerly instead of from CUDA graphs per 128-token bucket (the "
                         "engine's default on CUDA; GenerationEngine prefill_graphs=False), for A/B timing")
    ap.add_argument("--sync-decode", action="store_true",
                    help="read each decode step's tokens before the next launch "
                         "(GenerationEngine overlap_decode=False), for A/B timing")
    ap.add_argument("--profile-prefill", action="store_true",
                    help="per scheme and --prefill-len, one prefill under torch.profiler")
    ap.add_argument("--check-logits", action="store_true",
                    help="per scheme, one 128-token prefill through the engine vs the float model")
    ap.add_argument("--budget-s", type=float, default=420, help="deadline for the e2e rows")
    ap.add_argument("--correctness-s", type=float, default=60, help="extra seconds for correctness")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--out", default="e2e_generation.json")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    sq = import_sagequant()
    if args.smoke:
        lib.DEVICE = "cpu"
        device, dtype, backend, shape = torch.device("cpu"), torch.float32, "cpu", "tiny"
        args.layers, args.vocab, args.batches = 1, 512, [1, 2]
        args.prefill_len, args.prompt_len, args.new_tokens, args.prefill_reps = [32], 16, 6, 1
        args.long_context = 48 if args.long_context else 0
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --smoke, which runs backend cpu on CPU)")
        device, dtype, backend, shape = torch.device("cuda"), torch.bfloat16, "cuda", args.shape
    deadline = start + args.budget_s
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(shape=shape, backend=backend, dtype=str(dtype), full_layers=SHAPES[shape]["full_layers"],
                    **{k: v for k, v in SHAPES[shape].items() if k != "full_layers"})
    result = {"env": lib.environment(), "settings": settings}
    if args.smoke:
        result["note"] = ("smoke: CPU, tiny shapes, backend cpu (the CUDA rows need a GPU and triton); "
                          "the numbers time the reference kernels and mean nothing")
        print(result["note"], flush=True)
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(result, indent=1, default=str))
        out.with_suffix(".md").write_text(markdown(result) + "\n")

    status = e2e(sq, args, settings, backend, device, dtype, deadline, result, save) if args.schemes else 0
    if not args.skip_correctness:
        result["correctness"] = correctness(sq, backend, device, dtype, deadline + args.correctness_s)
        status |= int(any(c["status"] == "FAIL" for c in result["correctness"]))
        save()
    print(markdown(result))
    print(f"done in {time.perf_counter() - start:.0f}s -> {out} and {out.with_suffix('.md')}"
          + (" (FAILED: an error row or a correctness check)" if status else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
