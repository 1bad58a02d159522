"""Quantized-KV decode speed on one GPU (issue 6 item 5), bf16 KV in the same run.

  sweep    (--sweep-contexts) each cache dtype's decode attention at batch 1 under the SWEEP
           launch shapes; --pick then makes the fastest at the first sweep context that dtype's
           launch for everything after it in this process (kernel table, --e2e-generation).
  kernel   decode attention per layer, Llama-3-8B / Qwen2-7B-like attention (32 query heads,
           8 kv heads, head_dim 128, block 16): our Triton kernel on bf16 / int8 / fp8 paged
           blocks (and --baseline-module's, an older triton_kv_attention.py, on the same pools),
           and torch SDPA (flash / efficient, GQA) on a contiguous bf16 cache as the
           peer; CUDA-graph timing, rotating through layer copies so the KV never sits in L2;
           the HBM floor is the KV bytes read / measured copy bandwidth.
  write    (--write-batches) the decode step's attention prologue per layer: rotary of q, k and
           the cache write, fused (one kernel) vs the unfused ops (rotary kernels +
           PagedKVPool.write_decode).
  memory   KV bytes per token and the largest batch x context a fixed KV budget holds.
  e2e      GenerationEngine decode tokens/s of a 7B-shaped Llama (random bf16 weights, the first
           --e2e-layers layers, vocab 32000) with bf16 / int8 / fp8 KV at each context.

    python benchmarks/kv_decode_speed.py --out kv_speed.json          # H100, < 10 min
    python benchmarks/kv_decode_speed.py --smoke                      # CPU: tiny shapes, checks
                                                                      # the script (interpreter)
    python benchmarks/kv_decode_speed.py --skip-e2e --sweep-contexts 8192 --pick \
        --write-batches 1 8 --e2e-generation "--layers 32 --vocab 128256 --long-context 8192 ..."
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_bench_lib as lib  # noqa: E402  (CUDA-graph timing and bandwidth, shared with the GEMM tables)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
LAYERS_7B = 32
KV = ("none", "int8", "fp8")
# DecodeLaunch(tile_tokens, target_programs, num_warps, num_stages) shapes --sweep-contexts times
SWEEP = [(64, 512, 4, 2), (64, 512, 4, 3), (64, 512, 4, 1), (32, 512, 4, 2), (128, 512, 8, 2),
         (64, 1024, 4, 2)]


def sweep_launches() -> list:
    from sagequant.backends.cuda.triton_kv_attention import DecodeLaunch
    return [DecodeLaunch(*shape) for shape in SWEEP]


def make_pool(kv: str, copies: int, batch: int, ctx: int, dtype, device, heads=KV_HEADS, d=HEAD_DIM):
    """A pool with `copies` layers, each holding `batch` sequences of `ctx` random tokens."""
    from sagequant.ir.kv_plan import KVQuantPlan
    from sagequant.runtime.kv_pool import PagedKVPool
    plan = KVQuantPlan(dtype=kv, block_size=BLOCK)
    per_seq = math.ceil((ctx + 1) / BLOCK)
    pool = PagedKVPool(plan, [kv] * copies, heads, d, batch * per_seq, batch, dtype, device)
    random.Random(0).shuffle(pool._free)
    for s in range(batch):
        pool.open(s, ctx + 1)
        pool.lengths[s] = ctx
    for c in pool.layers:
        for t in (c.k, c.v):
            if kv == "none":
                t.normal_()
            elif kv == "int8":
                t.copy_(torch.randint(-127, 128, t.shape, dtype=torch.int8, device=device))
            else:
                t.copy_(torch.randn(t.shape, device=device, dtype=torch.float16).mul_(64).to(t.dtype))
        for t in (c.k_scale, c.v_scale):
            if t is not None:
                t.uniform_(0.005, 0.02)
    return pool


def copy_bandwidth(device) -> float | None:
    """Bytes read + written per second of a 1 GiB device copy, timed by CUDA-graph replay like the
    kernels (lib.measure_bandwidth's single event-timed copy reads ~20% higher on the H100)."""
    if device.type != "cuda":
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    us = lib.time_graph([lambda: b.copy_(a)], 0.02)["us"]
    return 2 * a.numel() / (us * 1e-6)


def load_baseline(path: str | None):
    """An older triton_kv_attention.py (same paged_decode_attention signature, no launch arg)."""
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("baseline_triton_kv_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _attention_fns(impl, pool, q, batch, ctx, launch=None):
    table = pool.block_table(list(range(batch)))
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=q.device)
    extra = () if launch is None else (launch,)
    # the open block from the tail: this module's kernel; a --baseline-module one may predate it
    tails = "tail" in inspect.signature(impl.paged_decode_attention).parameters
    slots = torch.arange(batch, device=q.device)
    return [lambda c=c: impl.paged_decode_attention(
        q, c.k, c.v, c.k_scale, c.v_scale, table, lens, ctx, None, 0, *extra,
        **(dict(tail=c.tail, slots=slots) if tails and c.quantized else {})) for c in pool.layers]


def sweep_table(contexts, dtype, device, l2_bytes, heads=HEADS, kv_heads=KV_HEADS, d=HEAD_DIM) -> list:
    """Batch-1 decode attention µs per cache dtype and SWEEP launch shape."""
    impl = importlib.import_module("sagequant.backends.cuda.triton_kv_attention")
    q = torch.randn(1, heads, 1, d, device=device).to(dtype)
    rows = []
    for ctx in contexts:
        copies = max(1, min(16, math.ceil(4 * l2_bytes / (2 * ctx * kv_heads * d * 2))))
        for kv in KV:
            pool = make_pool(kv, copies, 1, ctx, dtype, device, kv_heads, d)
            row = {"context": ctx, "kv": kv}
            for launch in sweep_launches():
                try:
                    row[launch.describe()] = round(lib.time_graph(_attention_fns(impl, pool, q, 1, ctx, launch), 0.02)["us"], 2)
                except Exception as e:  # a launch shape that fails to compile or run is reported
                    row[launch.describe()] = f"error: {lib.short_error(e)}"
            print(row, flush=True)
            rows.append(row)
            del pool
    return rows


def pick_launches(sweep: list, context: int) -> dict:
    """Each cache dtype's fastest SWEEP launch at `context`, made its LAUNCH in this process."""
    impl = importlib.import_module("sagequant.backends.cuda.triton_kv_attention")
    picked = {}
    for row in sweep:
        if row["context"] != context:
            continue
        timed = [(row[x.describe()], x) for x in sweep_launches() if isinstance(row.get(x.describe()), float)]
        if timed:
            impl.LAUNCH[row["kv"]] = min(timed, key=lambda t: t[0])[1]
            picked[row["kv"]] = impl.LAUNCH[row["kv"]].describe()
    print("picked launches:", picked, flush=True)
    return picked


def write_table(batches, dtype, device, heads=HEADS, kv_heads=KV_HEADS, d=HEAD_DIM, ctx=1000) -> list:
    """µs per layer of the decode step's prologue (rotary of q, k + cache write), fused vs the
    unfused ops, per cache dtype, a token written mid-block after `ctx` cached ones; quantized
    caches also "fused_fill": the write that fills its block and so quantizes it (1 in
    block_size decode writes)."""
    from sagequant.backends.cuda import fused
    sixteen = importlib.import_module("sagequant.backends.cuda.triton_fused").rope_cache_decode
    rows = []
    for batch in batches:
        row = {"batch": batch}
        q = torch.randn(batch, heads, 1, d, device=device).to(dtype)
        k, v = (torch.randn(batch, kv_heads, 1, d, device=device).to(dtype) for _ in range(2))
        cos, sin = (torch.randn(batch, 1, 1, d, device=device).to(dtype) for _ in range(2))
        for kv in KV:
            pool = make_pool(kv, 4, batch, ctx, dtype, device, kv_heads, d)
            index = pool.decode_index(list(range(batch)), [ctx] * batch)
            index.nonfinite = torch.zeros(1, dtype=torch.bool, device=device)

            def unfused(layer):
                qr, kr = fused.rotary_embedding(q, cos, sin), fused.rotary_embedding(k, cos, sin)
                pool.write_decode(layer, index, kr, v)
                return qr
            fill = pool.decode_index(list(range(batch)), [ctx | (BLOCK - 1)] * batch)
            fill.nonfinite = index.nonfinite

            def one_kernel(layer, at=index):   # what fused.rope_cache_decode runs on the GPU
                c = pool.layers[layer]
                if c.quantized:
                    return fused.quantized_cache_decode(q, k, v, cos, sin, c, at)
                return sixteen(q, k, v, cos, sin, c.k, c.v, at.block_table, at.positions)
            fns = {"fused": [lambda i=i: one_kernel(i) for i in range(4)],
                   "unfused": [lambda i=i: unfused(i) for i in range(4)]}
            if kv != "none":
                fns["fused_fill"] = [lambda i=i: one_kernel(i, fill) for i in range(4)]
            for name, f in fns.items():
                try:
                    row[f"{kv}_{name}_us"] = round(lib.time_graph(f, 0.02)["us"], 2)
                except Exception as e:
                    row[f"{kv}_{name}_us"] = f"error: {lib.short_error(e)}"
            del pool
        print(row, flush=True)
        rows.append(row)
    return rows


def kernel_table(contexts, batches, dtype, device, l2_bytes, heads=HEADS, kv_heads=KV_HEADS, d=HEAD_DIM,
                 baseline=None):
    impl = importlib.import_module("sagequant.backends.cuda.triton_kv_attention")
    bw = copy_bandwidth(device)
    rows = []
    for ctx in contexts:
        for batch in batches:
            row = {"context": ctx, "batch": batch}
            bf16_bytes = 2 * batch * ctx * kv_heads * d * 2
            copies = max(1, min(16, math.ceil(4 * l2_bytes / bf16_bytes)))
            q = torch.randn(batch, heads, 1, d, device=device).to(dtype)
            for kv in KV:
                try:
                    pool = make_pool(kv, copies, batch, ctx, dtype, device, kv_heads, d)
                except torch.OutOfMemoryError:
                    row[f"{kv}_us"] = "OOM"
                    continue
                row[f"{kv}_us"] = round(lib.time_graph(_attention_fns(impl, pool, q, batch, ctx), 0.02)["us"], 2)
                if baseline is not None:
                    row[f"old_{kv}_us"] = round(lib.time_graph(_attention_fns(baseline, pool, q, batch, ctx), 0.02)["us"], 2)
                kv_bytes = pool.bytes_per_token() / copies * batch * ctx
                row[f"{kv}_floor_us"] = round(kv_bytes / bw * 1e6, 2) if bw else None
                del pool
                torch.cuda.empty_cache() if device.type == "cuda" else None
            # Peer: SDPA over a contiguous bf16 cache (what an unpaged engine would run).
            try:
                ks = [torch.randn(batch, kv_heads, ctx, d, device=device, dtype=dtype) for _ in range(copies)]
                vs = [torch.randn_like(k) for k in ks]
                fns = [lambda k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, enable_gqa=True) for k, v in zip(ks, vs)]
                row["sdpa_bf16_us"] = round(lib.time_graph(fns, 0.02)["us"], 2)
                del ks, vs, fns
            except (RuntimeError, torch.OutOfMemoryError) as e:
                row["sdpa_bf16_us"] = f"error: {str(e).splitlines()[0][:80]}"
            for base in ("none_us", "old_none_us"):
                for kv in ("int8", "fp8", "none"):
                    if isinstance(row.get(base), float) and isinstance(row.get(f"{kv}_us"), float):
                        row[f"{kv}_speedup_vs_{base[:-3]}"] = round(row[base] / row[f"{kv}_us"], 2)
            print(row, flush=True)
            rows.append(row)
    return rows


def memory_table(budget_gib: float, contexts) -> dict:
    """Llama-3-8B KV (32 layers x 8 kv heads x 128): bytes/token and max batch per context."""
    from sagequant.ir.kv_plan import KVQuantPlan
    from sagequant.runtime.kv_pool import PagedKVPool
    out = {"budget_GiB": budget_gib}
    for kv in KV:
        pool = PagedKVPool(KVQuantPlan(dtype=kv, block_size=BLOCK), [kv] * LAYERS_7B, KV_HEADS, HEAD_DIM,
                           1, 1, torch.bfloat16, torch.device("meta"))
        per_token = pool.bytes_per_token()
        tokens = int(budget_gib * 2**30 // per_token)
        out[kv] = {"bytes_per_token": per_token, "max_tokens": tokens,
                   **{f"max_batch_at_{c}": tokens // c for c in contexts}}
    out["ratio_int8_vs_bf16"] = out["int8"]["bytes_per_token"] / out["none"]["bytes_per_token"]
    return out


def e2e_table(contexts, batches, layers, new_tokens, dtype, device, deadline, tiny=False,
              graph_modes=(True, False)):
    import transformers as tf

    import sagequant as sq
    from sagequant.api import CompiledModel
    from sagequant.ir.kv_plan import build_kv_plan
    from sagequant.runtime import GenerationEngine
    shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=HEADS,
                 num_key_value_heads=KV_HEADS, vocab_size=32000)
    if tiny:
        shape = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=128)
    cfg = tf.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max(contexts) + new_tokens + 16,
                         **shape)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = tf.LlamaForCausalLM(cfg).to(dtype).eval()
    t0 = time.perf_counter()
    cm = sq.compile(model, sq.QuantConfig(ignore=["*"]))   # float weights: the KV is under test
    print(f"traced + compiled {layers} layers in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for ctx in contexts:
        for batch in batches:
            row = {"context": ctx, "batch": batch}
            for kv, graphs in [(kv, g) for g in graph_modes for kv in KV]:
                name = kv if graphs else f"{kv}_eager"
                if time.perf_counter() > deadline:
                    row[name] = "skipped (time budget)"
                    continue
                c2 = cm.config.replace(kv_cache_dtype=kv)
                try:
                    engine = GenerationEngine(CompiledModel(cm.graph, c2, build_kv_plan(c2), []), max_batch=batch,
                                              max_seq_len=ctx + new_tokens + 1, device=device, cuda_graphs=graphs,
                                              num_kv_blocks=batch * math.ceil((ctx + new_tokens + 1) / BLOCK))
                    row.update(_decode_rate(engine, batch, ctx, new_tokens, shape["vocab_size"], device, name))
                except Exception as e:  # report and go on: one broken mode must not hide the others
                    row[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                torch.cuda.empty_cache() if device.type == "cuda" else None
            for kv in ("int8", "fp8"):
                if isinstance(row.get(f"{kv}_tok_s"), float) and isinstance(row.get("none_tok_s"), float):
                    row[f"{kv}_speedup"] = round(row[f"{kv}_tok_s"] / row["none_tok_s"], 2)
            print(row, flush=True)
            rows.append(row)
    return rows


def _decode_rate(engine, batch, ctx, new_tokens, vocab, device, name) -> dict:
    """Prefill `batch` random prompts of `ctx` tokens, then time the decode steps."""
    g = torch.Generator().manual_seed(1)
    for _ in range(batch):
        engine.add_request(torch.randint(0, vocab, (ctx,), generator=g).tolist(), new_tokens)
    engine.step()          # prefill everyone + the first decode step (captures the graph)
    engine.step()
    sync(device)
    t0 = time.perf_counter()
    calls, launched = 0, engine.graphs.launches if engine.graphs else 0
    while engine.has_work():
        engine.step()
        calls += 1
    sync(device)
    dt = time.perf_counter() - t0
    # Decode steps run, not step() calls: an overlapped engine's last call only reads tokens.
    steps = engine.graphs.launches - launched if engine.graphs else calls
    return {f"{name}_tok_s": round(batch * steps / dt, 1), f"{name}_ms_per_step": round(1e3 * dt / max(steps, 1), 2)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    ap.add_argument("--contexts", type=int, nargs="*", default=[2048, 8192, 32768])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--e2e-batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--e2e-layers", type=int, default=4)
    ap.add_argument("--e2e-new-tokens", type=int, default=32)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--kv-budget-gib", type=float, default=60.0)
    ap.add_argument("--baseline-module", help="an older triton_kv_attention.py timed on the same pools")
    ap.add_argument("--sweep-contexts", type=int, nargs="*", default=[])
    ap.add_argument("--pick", action="store_true", help="use the sweep's fastest launch from here on")
    ap.add_argument("--write-batches", type=int, nargs="*", default=[])
    ap.add_argument("--e2e-generation", default="",
                    help="then run benchmarks/e2e_generation.py with these arguments in this process")
    ap.add_argument("--out", default="kv_speed.json")
    args = ap.parse_args()
    start = time.perf_counter()
    if args.smoke:
        from sagequant.backends.cuda.interpret import enable_triton_interpreter
        enable_triton_interpreter()
        lib.DEVICE = "cpu"
        device, dtype, l2 = torch.device("cpu"), torch.float16, 1 << 16
        contexts, batches, e2e_batches = [64, 200], [1, 3], [1, 2]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --smoke on CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 50 << 20)
        contexts, batches, e2e_batches = args.contexts, args.batches, args.e2e_batches
    env = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(env, flush=True)
    result = {"env": env, "memory": memory_table(args.kv_budget_gib, contexts)}
    print(json.dumps(result["memory"], indent=1), flush=True)
    kw = dict(heads=4, kv_heads=2, d=64) if args.smoke else {}
    if args.sweep_contexts:
        result["sweep"] = sweep_table(args.sweep_contexts, dtype, device, l2, **kw)
        if args.pick:
            result["picked_launch"] = pick_launches(result["sweep"], args.sweep_contexts[0])
        json.dump(result, open(args.out, "w"), indent=1)
    if args.write_batches:
        result["write"] = write_table(args.write_batches, dtype, device, **kw)
        json.dump(result, open(args.out, "w"), indent=1)
    if not args.skip_kernel:
        result["kernel"] = kernel_table(contexts, batches, dtype, device, l2, **kw,
                                        baseline=load_baseline(args.baseline_module))
    json.dump(result, open(args.out, "w"), indent=1)
    if args.e2e_generation:
        import e2e_generation
        result["e2e_generation_status"] = e2e_generation.main(shlex.split(args.e2e_generation))
        json.dump(result, open(args.out, "w"), indent=1)
    if not args.skip_e2e:
        result["e2e"] = e2e_table(contexts, e2e_batches, 2 if args.smoke else args.e2e_layers,
                                  4 if args.smoke else args.e2e_new_tokens, torch.float32 if args.smoke else dtype,
                                  device, start + args.budget_s, tiny=args.smoke,
                                  graph_modes=(True, False))
    json.dump(result, open(args.out, "w"), indent=1)
    print(f"done in {time.perf_counter() - start:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
