"""What `sagequant engine start` serves and how: the compiled model (compiled here or loaded from
an artifact), its tokenizer, the generation engine, and uvicorn on a socket bound here (so port 0
works and the real port is known before the state entry is written).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, QuantConfig
from ..errors import ServingError
from ..progress import phase

# --quantization -> QuantConfig fields. Activations stay 16-bit unless the name says otherwise
# (--activation-dtype overrides, e.g. fp8 weights with fp8 activations for W8A8-FP8).
QUANTIZATIONS = {
    "int4": {"weight_dtype": "int4", "activation_dtype": "a16"},
    "int8": {"weight_dtype": "int8", "activation_dtype": "a16"},
    "w8a16": {"weight_dtype": "int8", "activation_dtype": "a16"},
    "fp8": {"weight_dtype": "fp8", "activation_dtype": "a16"},
    "w8a8": {"weight_dtype": "w8a8", "activation_dtype": "w8a8"},
    "nf4": {"weight_dtype": "nf4", "activation_dtype": "a16"},
    "none": {"ignore": ["*"]},  # every linear stays float: the unquantized baseline
}
DEFAULT_CONTEXT = 2048


@dataclass
class ServeOptions:
    model: str
    quantization: str | None = None
    activation_dtype: str | None = None
    kv_quant: str | None = None
    backend: str | None = None  # cpu unless an artifact says otherwise
    group_size: int | None = None
    dataset: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_seq_len: int | None = None
    num_kv_blocks: int | None = None
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    request_timeout: float | None = 300.0


def is_artifact(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def quant_config(opts: ServeOptions) -> QuantConfig:
    if opts.quantization not in QUANTIZATIONS:
        raise ConfigError(f"--quantization {opts.quantization!r} is not supported; valid: "
                          f"{', '.join(QUANTIZATIONS)}")
    fields = dict(QUANTIZATIONS[opts.quantization])
    if opts.activation_dtype is not None:
        if opts.quantization == "none":
            raise ConfigError("--activation-dtype needs quantized weights; --quantization none keeps "
                              "every layer float")
        fields["activation_dtype"] = opts.activation_dtype
    if opts.group_size is not None:
        fields["group_size"] = None if opts.group_size <= 0 else opts.group_size
    fields["kv_cache_dtype"] = opts.kv_quant or "none"
    fields["backend"] = opts.backend or "cpu"
    return QuantConfig.from_dict(fields)


def load_compiled(opts: ServeOptions, step=lambda note: None):
    """(CompiledModel, tokenizer source): loads an artifact dir or compiles MODEL with the flags;
    `step(note)` after loading the model and after compiling it (progress)."""
    from ..api import compile as sq_compile, load
    if is_artifact(opts.model):
        cm = load(opts.model)
        step("artifact loaded")
        step("served as compiled")
        _check_artifact_flags(opts, cm.config)
        source = opts.tokenizer or cm.graph.model_info.get("source")
        if source is None:
            raise ConfigError(f"artifact {opts.model!r} does not record its source model; pass "
                              "--tokenizer MODEL")
        return cm, source
    if opts.quantization is None:
        raise ConfigError(f"{opts.model!r} is a model, not an artifact: --quantization is required "
                          f"({', '.join(QUANTIZATIONS)})")
    from ..calibration.data_sources import load_dataset
    from ..frontends.models import resolve_model
    cfg = quant_config(opts)
    model, tok = resolve_model(opts.model)
    step("model loaded")
    texts = load_dataset(opts.dataset, seq_len=cfg.calibration_seq_len) if opts.dataset else None
    cm = sq_compile(model, cfg, calibration_data=texts, tokenizer=tok)
    cm.graph.model_info["source"] = opts.model
    step(f"compiled {cfg.scheme}")
    return cm, opts.tokenizer or opts.model


def _check_artifact_flags(opts: ServeOptions, cfg: QuantConfig) -> None:
    """An artifact is served as compiled: flags that would change it are refused, not ignored."""
    if opts.quantization is not None:
        wanted = quant_config(opts)
        if (wanted.scheme, wanted.ignore) != (cfg.scheme, cfg.ignore) and not (
                opts.quantization == "none" and cfg.ignore == ["*"]):
            raise ConfigError(f"artifact {opts.model!r} was compiled as {cfg.scheme}; --quantization "
                              f"{opts.quantization} asks for {wanted.scheme}: leave the flag out or "
                              "recompile")
    if opts.kv_quant is not None and opts.kv_quant != cfg.kv_cache_dtype:
        raise ConfigError(f"artifact {opts.model!r} was compiled with kv_cache_dtype="
                          f"{cfg.kv_cache_dtype!r}; --kv-quant {opts.kv_quant} differs: leave it "
                          "out or recompile")
    if opts.backend is not None and opts.backend != cfg.backend:
        raise ConfigError(f"artifact {opts.model!r} was compiled for backend {cfg.backend!r}, not "
                          f"{opts.backend!r}: recompile for {opts.backend}")


def context_length(cm, opts: ServeOptions) -> int:
    limit = cm.graph.model_info.get("hf_config", {}).get("max_position_embeddings")
    if opts.max_seq_len is not None:
        if limit and opts.max_seq_len > limit:
            raise ConfigError(f"--max-seq-len {opts.max_seq_len} exceeds the model's "
                              f"max_position_embeddings {limit}")
        return opts.max_seq_len
    return min(limit or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


SERVER_PACKAGES = ("fastapi", "uvicorn")
SWITCH_INTERVAL_S = 5e-4   # the serving process's GIL switch interval (run())


def require_server_packages() -> None:
    """Before the model loads (minutes at 8B): a missing server package of the install is the
    user's environment, not a bug, and names the fix."""
    import importlib.util
    missing = [m for m in SERVER_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise ServingError(f"engine start needs {', '.join(missing)} (dependencies of sagellm-quantization, "
                           f"not installed here): pip install {' '.join(missing)}")


def build_server(opts: ServeOptions):
    """-> (FastAPI app, ServedModel): compile or load, then the engine and its loop."""
    from ..frontends.models import resolve_tokenizer
    require_server_packages()
    with phase("engine start", total=3, unit="step") as p:
        cm, tok_source = load_compiled(opts, lambda note: p.advance(note=note))
        served = make_app(cm, resolve_tokenizer(tok_source), opts)
        p.advance(note="engine ready")
    return served


def make_app(cm, tokenizer, opts: ServeOptions):
    """The server of an already compiled model: engine, engine loop, FastAPI app."""
    from ..runtime import GenerationEngine
    from .app import ServedModel, build_app
    from .engine_loop import EngineLoop
    ctx = context_length(cm, opts)
    engine = GenerationEngine(cm, max_batch=opts.max_batch, max_seq_len=ctx,
                              num_kv_blocks=opts.num_kv_blocks,
                              device="cuda" if cm.config.backend == "cuda" else "cpu")
    if engine.graphs is not None:
        engine.graphs.capture_all()   # before the first request, not during it
    if engine.prefill_graphs is not None:
        engine.prefill_graphs.capture_all()
    name = opts.served_model_name or Path(str(opts.model).rstrip("/")).name
    served = ServedModel(name, tokenizer, ctx, int(cm.graph.model_info["vocab_size"]),
                         opts.default_max_tokens, max_body_bytes=opts.max_body_bytes,
                         max_prompt_tokens=opts.max_prompt_tokens, request_timeout_s=opts.request_timeout)
    loop = EngineLoop(engine, max_pending=opts.max_batch + opts.max_queue)
    return build_app(loop, served), served


def check_host(host: str, allow_remote: bool) -> None:
    """Only loopback unless the user explicitly opts in: the API has no authentication."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ServingError(f"--host {host!r} is not an IP address or 'localhost'") from None
    if not loopback and not allow_remote:
        raise ServingError(f"--host {host} would expose the server (no authentication) beyond this "
                           "machine; pass --allow-remote to bind it anyway")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServingError(f"cannot bind {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def run(app, served, sock: socket.socket, state_directory: Path | None, log_file: str | None,
        log_level: str = "warning") -> None:
    """Serve until SIGINT/SIGTERM; the state entry exists exactly while serving."""
    import uvicorn
    from .state import engine_id, remove_entry, write_entry
    host, port = sock.getsockname()[:2]
    ident = engine_id(served.name, port)
    # The engine thread and the event loop share the GIL; a thread that gave it up for a GPU
    # wait and wants it back waits up to the switch interval (5 ms by default) behind the event
    # loop's per-token work, a third of a decode step at 8B. 0.5 ms bounds that wait.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if state_directory is not None:
        write_entry(state_directory, {"id": ident, "pid": os.getpid(), "host": host, "port": port,
                                      "model": served.name, "url": f"http://{_url_host(host)}:{port}",
                                      "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                      "log": log_file})
    print(f"sagequant engine {ident}: serving {served.name!r} on http://{_url_host(host)}:{port} "
          f"(context {served.context_length} tokens)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        if state_directory is not None:
            remove_entry(state_directory, ident, os.getpid())


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
