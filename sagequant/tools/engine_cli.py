"""`sagequant engine start | list | stop` (registered by cli.py; server imports are lazy so
the rest of the CLI does not pay for FastAPI)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .. import progress
from ..safe_write import check_output_dir
from ..serving.launch import QUANTIZATIONS, ServeOptions, ServingError
from ..serving.state import EngineStateError, list_engines, state_dir, stop_engine
from .arg_types import group_size, int_at_least, non_negative_int, port, positive_float, positive_int

_OPTION_FLAGS = ("quantization", "activation_dtype", "kv_quant", "backend", "group_size", "dataset",
                 "tokenizer", "served_model_name", "max_batch", "max_queue", "max_seq_len",
                 "num_kv_blocks", "default_max_tokens", "max_body_bytes", "max_prompt_tokens",
                 "request_timeout")


def add_engine_parser(sub) -> None:
    eng = sub.add_parser("engine", help="serve a model over an OpenAI-compatible HTTP API")
    esub = eng.add_subparsers(dest="engine_command", required=True)
    s = esub.add_parser("start", help="compile (or load an artifact) and serve it")
    s.add_argument("model", metavar="MODEL_OR_ARTIFACT",
                   help='"smollm2", a transformers checkpoint dir, a .gguf file (or a dir holding one), '
                        'or a sagequant artifact dir')
    s.add_argument("--quantization", choices=list(QUANTIZATIONS),
                   help="weights to compile to (required for a model; an artifact is served as compiled)")
    s.add_argument("--activation-dtype", help="override: a16 | int8 | fp8 (e.g. fp8 + fp8 = W8A8-FP8)")
    s.add_argument("--kv-quant", choices=["none", "int8", "fp8"])
    s.add_argument("--backend", choices=["cpu", "cuda"])
    s.add_argument("--group-size", type=group_size, help="weight group size; 0 for per-channel")
    s.add_argument("--dataset", help="calibration data for calibrated schemes: wikipedia | news, a "
                   ".jsonl / text file, a directory of text files, or token ids (.npy / .safetensors)")
    s.add_argument("--tokenizer", help="model whose tokenizer to use (default: the model / the artifact's source)")
    s.add_argument("--served-model-name", help="the name clients pass as `model` (default: MODEL's basename)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port, default=8000, help="0 picks a free port")
    s.add_argument("--allow-remote", action="store_true",
                   help="allow --host to be a non-loopback address (the API has no authentication)")
    s.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together")
    s.add_argument("--max-queue", type=non_negative_int, default=64, help="requests waiting beyond the batch; more get HTTP 429")
    s.add_argument("--max-seq-len", type=int_at_least(2), help="context length (prompt + generated tokens)")
    s.add_argument("--num-kv-blocks", type=positive_int, help="KV-cache blocks (default: the engine's)")
    s.add_argument("--default-max-tokens", type=positive_int, default=256, help="chat requests without max_tokens")
    s.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                   help="largest request body; larger ones get HTTP 413 before they are read (default 1 MiB)")
    s.add_argument("--max-prompt-tokens", type=positive_int,
                   help="longest prompt in tokens; longer ones get HTTP 413 (default: the context length)")
    s.add_argument("--request-timeout", type=positive_float, default=300.0,
                   help="seconds a request may take; then it is aborted with HTTP 504 (default 300)")
    s.add_argument("--engine", choices=["sagequant", "vllm"], default="sagequant",
                   help="vllm: export compressed-tensors and run `vllm serve` on it")
    s.add_argument("--export-dir", help="--engine vllm: where the compressed-tensors checkpoint goes")
    s.add_argument("--overwrite", action="store_true",
                   help="--engine vllm: write --export-dir even if it holds files sagequant did not "
                   "write (only sagequant's own are replaced)")
    s.add_argument("--background", action="store_true", help="detach; see `engine list` / `engine stop`")
    s.add_argument("--start-timeout", type=positive_float, default=900, help="--background: seconds to wait for /health")
    s.add_argument("--state-dir", help="where running engines are recorded (default $SAGEQUANT_STATE_DIR "
                                       "or ~/.cache/sagequant/engines)")
    s.add_argument("--threads", type=positive_int, help="torch CPU threads of the engine (default: torch's)")
    s.add_argument("--log-level", default="warning")
    s.add_argument("--log-file", help=argparse.SUPPRESS)  # set by --background for its child
    s.set_defaults(func=cmd_start)
    ls = esub.add_parser("list", help="engines started on this machine (stale entries are removed)")
    ls.add_argument("--state-dir")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    st = esub.add_parser("stop", help="stop a running engine (SIGTERM, then SIGKILL)")
    st.add_argument("engine_id", nargs="?", help="an id from `engine list`")
    st.add_argument("--all", action="store_true")
    st.add_argument("--state-dir")
    st.add_argument("--timeout", type=positive_float, default=10.0)
    st.set_defaults(func=cmd_stop)


def serve_options(args) -> ServeOptions:
    return ServeOptions(model=args.model, **{k: getattr(args, k) for k in _OPTION_FLAGS})


def child_argv(args) -> list[str]:
    """The foreground `engine start` command a --background start runs detached."""
    argv = [sys.executable, "-m", "sagequant", "engine", "start", args.model, "--host", args.host,
            "--port", str(args.port), "--log-level", args.log_level,
            "--state-dir", str(state_dir(args.state_dir))]
    for name in _OPTION_FLAGS:
        value = getattr(args, name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    if args.allow_remote:
        argv.append("--allow-remote")
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv


def cmd_start(args) -> int:
    from ..serving.launch import check_host
    check_host(args.host, args.allow_remote)
    if args.engine == "vllm":
        return _start_vllm(args)
    if args.background:
        return _start_background(args)
    from ..serving.launch import bind, build_server, run
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    sock = bind(args.host, args.port)  # fail on a taken port before the (long) compile
    try:
        app, served = build_server(serve_options(args))
    except BaseException:
        sock.close()
        raise
    run(app, served, sock, state_dir(args.state_dir), args.log_file, args.log_level)
    return 0


def _start_background(args) -> int:
    directory = state_dir(args.state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / f"engine-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    argv = child_argv(args) + ["--log-file", str(log)]
    with open(log, "wb") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    progress.log(f"engine starting in the background (pid {child.pid}); its progress is in {log}")
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise ServingError(f"the engine exited with status {child.returncode} before serving; "
                               f"log {log}:\n{tail}")
        entry = next((e for e in list_engines(directory)[0] if e.get("pid") == child.pid), None)
        if entry is not None and _healthy(entry["url"]):
            print(f"engine {entry['id']} (pid {child.pid}) serving on {entry['url']}; log {log}")
            return 0
        time.sleep(0.5)
    child.terminate()
    raise ServingError(f"the engine did not become healthy within {args.start_timeout:.0f} s "
                       f"(stopped it); log {log}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _start_vllm(args) -> int:
    from ..serving.launch import load_compiled
    from ..serving.vllm import check_available, export_for_vllm, vllm_command
    if args.background:
        raise ServingError("--background is for the sagequant engine; run `vllm serve` under your "
                           "process manager (the command is printed by --engine vllm)")
    opts = serve_options(args)
    name = opts.served_model_name or Path(str(opts.model).rstrip("/")).name
    checkpoint = Path(args.export_dir or f"{name}-compressed-tensors")

    def vllm_argv(kv_cache_dtype: str) -> list[str]:
        return vllm_command(checkpoint, served_model_name=name, host=args.host, port=args.port,
                            kv_cache_dtype=kv_cache_dtype, max_model_len=opts.max_seq_len,
                            max_num_seqs=opts.max_batch)
    check_available(vllm_argv(opts.kv_quant or "none"))  # before the compile: say what is missing
    check_output_dir(checkpoint, args.overwrite, what="compressed-tensors checkpoint")
    cm, tok_source = load_compiled(opts)
    argv = vllm_argv(cm.config.kv_cache_dtype)  # an artifact brings its own KV dtype
    from ..frontends.models import resolve_tokenizer
    export_for_vllm(cm, resolve_tokenizer(tok_source), checkpoint, overwrite=args.overwrite)
    print("running: " + " ".join(argv), flush=True)
    return subprocess.call(argv)


def cmd_list(args) -> int:
    running, stale = list_engines(state_dir(args.state_dir))
    if args.json:
        print(json.dumps({"running": running, "stale_removed": stale}, indent=1))
        return 0
    for e in stale:
        print(f"removed stale entry {e.get('id')} (pid {e.get('pid')} is not running)")
    if not running:
        print("no engines running")
    for e in running:
        print(f"{e['id']:<30} pid {e['pid']:<8} {e['url']:<28} model {e['model']}  since {e['started_at']}")
    return 0


def cmd_stop(args) -> int:
    directory = state_dir(args.state_dir)
    if args.all == bool(args.engine_id):
        raise ServingError("engine stop needs an ENGINE_ID or --all (not both)")
    ids = [e["id"] for e in list_engines(directory)[0]] if args.all else [args.engine_id]
    for ident in ids:
        entry = stop_engine(directory, ident, args.timeout)
        print(f"stopped {ident} (pid {entry['pid']}{', killed' if entry.get('killed') else ''})")
    if not ids:
        print("no engines running")
    return 0
