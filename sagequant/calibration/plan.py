"""Pre-flight plan of a layer-wise compile: peak device memory, CPU memory, disk and time,
estimated from the checkpoint's config.json and the QuantConfig before any weight is read.

Device memory is the largest block's weights + the inter-block activation cache (unless
offloaded) + one sample's activations inside a block (or convert's float32 copies of the
largest linear, whichever is larger) + the method's statistics (GPTQ: the float64 Hessians of one
true-sequential stage plus one layer's rounding workspace; AWQ: the sampled input rows). CPU
memory is what the process holds (finished blocks are file-backed mappings, reported apart).
Time counts the block forwards each method runs (observe, search, commit), GPTQ's error
propagation and AWQ's grid searches as FLOPs at a sustained device rate, the checkpoint read and
the per-block recording of the finished tensors. The rates are stated constants (the recording
rate measured on an H100 machine), not measurements of this machine.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import QuantConfig
from ..config.calibration import AWQ_METHODS, GPTQ_METHODS
from ..errors import ConfigError

GIB = 1 << 30
# Sustained rates the time estimate assumes (FLOP/s of float32 / bfloat16 GEMMs, bytes/s read).
DEVICE_FLOPS = {("cuda", torch.float32): 45e12, ("cuda", torch.bfloat16): 400e12,
                ("cpu", torch.float32): 0.5e12, ("cpu", torch.bfloat16): 0.2e12}
DISK_BYTES_PER_S = 1.5e9
# Per block, recording its finished tensors (device -> CPU copy, safetensors write, fsync): bytes
# recorded per second. Measured: H100 run 3 (BENCHMARKS 12f), the block loop's save phase, 0.89 s
# per GiB for the 8B GPTQ and 0.90 for the 70B-width RTN (run 1's 5.3 s per GiB, fitted on the
# whole block loop, had absorbed the per-sample weight dequantization fixed since).
SEGMENT_WRITE_BYTES_PER_S = GIB / 0.9
# GPTQ rounds one input column at a time, launch-bound on a GPU. H100 run 3: the calibrate phase
# of the 8B GPTQ (165 s for 32 x 26,624 columns, the float64 Hessians included) less its
# observation run; ~0.5 ms on the 2-core CI box (scale_compile --smoke).
GPTQ_COLUMN_SECONDS = {"cuda": 1.9e-4, "cpu": 5e-4}
# One decoder block run for one calibration sample, beyond its FLOPs: the runner dispatches the
# block's ~100 ops from Python (estimate: ~15 us each; not yet measured on its own).
SAMPLE_BLOCK_SECONDS = 1.5e-3
# Host work outside the block loop (two-block trace, pipeline set-up, checkpoint index), H100 run 3:
# compile minus block loop, 11.8-12.4 s for the 8B checkpoint directory (3.4-4.1 s at every depth
# for the 70B-width generated weights: the trace no longer grows with depth).
HOST_SECONDS = 12.0
# AWQ's scale and clip searches quantize the whole block once per candidate ratio, in many small
# elementwise kernels: bytes of device traffic per block parameter and candidate, fitted on H100
# run 2's AWQ block loop (133 s) less its forwards and saves; the CPU figure assumes the same
# traffic at its bandwidth.
AWQ_CANDIDATE_BYTES_PER_PARAM = 660
DEVICE_BYTES_PER_S = {"cuda": 2.0e12, "cpu": 1.0e10}
# What a process holds before any weight (interpreter, torch, the CUDA context and its libraries).
PROCESS_BYTES = {"cuda": int(1.0 * GIB), "cpu": int(0.3 * GIB)}
# Full block forwards over every sample, per method: statistics run(s) + the commit run.
FORWARDS = {"minmax": 1, "percentile": 1, "smoothquant": 3, "awq": 2, "smoothquant+awq": 3, "gptq": 2,
            "awq+gptq": 3, "smoothquant+gptq": 3}
# Observed by the caching allocator on top of the live tensors (fragmentation, workspaces).
ALLOCATOR_SLACK = 1.1


@dataclass
class Shape:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> "Shape":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{str(directory)!r} has no config.json: not a transformers checkpoint")
        return cls.from_config(json.loads(path.read_text()), str(path))

    @classmethod
    def from_config(cls, c: dict, where: str = "the model config") -> "Shape":
        try:
            heads = c["num_attention_heads"]
            return cls(c["hidden_size"], c["intermediate_size"], heads, c.get("num_key_value_heads", heads),
                       c.get("head_dim") or c["hidden_size"] // heads, c["num_hidden_layers"],
                       c["vocab_size"], bool(c.get("tie_word_embeddings", False)))
        except KeyError as e:
            raise ConfigError(f"{where}: no {e.args[0]} (the plan models Llama-style decoder blocks)") from None

    def linears(self) -> list[tuple[int, int]]:
        """(out, in) of one block's linears: q, k, v, o, gate, up, down."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        return [(q, h), (kv, h), (kv, h), (h, q), (self.ffn, h), (self.ffn, h), (h, self.ffn)]

    def shared_input_linears(self) -> list[tuple[int, int]]:
        """(stacked out, in) per input value the block's linears read: q|k|v, o, gate|up, down
        (GPTQ observes one Hessian per input and rounds those linears as one stacked matrix)."""
        (q, h), (kv, _), _, o, (f, _), _, down = self.linears()
        return [(q + 2 * kv, h), o, (2 * f, h), down]

    def block_params(self) -> int:
        return sum(o * i for o, i in self.linears()) + 2 * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)


@dataclass
class Plan:
    method: str
    device: str
    peak_device_bytes: int
    peak_cpu_bytes: int
    disk_bytes: int
    seconds: float
    detail: dict

    def lines(self) -> list[str]:
        d = self.detail
        return [f"plan ({self.method} on {self.device}, {d['samples']} x {d['seq_len']} tokens, "
                f"{d['layers']} blocks of {d['block_params'] / 1e6:.0f}M parameters):",
                f"  peak {self.device} memory {self.peak_device_bytes / GIB:.2f} GiB (block weights "
                f"{d['block_weight_bytes'] / GIB:.2f}, activation cache {d['cache_bytes'] / GIB:.2f}"
                f"{' in CPU memory' if d['offload_cache'] else ''}, per-sample work {d['work_bytes'] / GIB:.2f}, "
                f"{self.method} statistics {d['stats_bytes'] / GIB:.2f})",
                f"  peak CPU memory {self.peak_cpu_bytes / GIB:.2f} GiB (+ {d['mapped_bytes'] / GIB:.2f} GiB "
                f"of finished blocks mapped from their files), disk {self.disk_bytes / GIB:.2f} GiB "
                f"(segment records + artifact), time ~{self.seconds:.0f} s"]

    def to_dict(self) -> dict:
        return asdict(self)


def plan_layerwise(shape: Shape, cfg: QuantConfig, device: torch.device, dtype: torch.dtype,
                   offload_cache: bool = False, checkpoint_bytes: int | None = None) -> Plan:
    b = torch.empty((), dtype=dtype).element_size()
    n, t, h = cfg.calibration_samples, cfg.calibration_seq_len, shape.hidden
    tokens = n * t
    block_weights = shape.block_params() * b
    # Between blocks: the hidden state, rotary cos/sin and a boolean causal mask per sample.
    cache = n * (t * h * b + 2 * t * shape.head_dim * b + t * t)
    # Inside a block, one sample: MLP intermediates (gate, up, product) and attention (q, k, v, out).
    work = t * (3 * shape.ffn + 4 * shape.heads * shape.head_dim) * b + shape.heads * t * t * b
    stats = _stats_bytes(shape, cfg)
    # convert of the largest linear: its weight in float32 and the scaled / rounded copies
    o, i = max(shape.linears(), key=lambda oi: oi[0] * oi[1])
    work = max(work, 4 * o * i * 4)
    device_peak = int(ALLOCATOR_SLACK * (block_weights + (0 if offload_cache else cache) + work + stats))
    quantized = _quantized_bytes(shape, cfg)
    float_kept = shape.embedding_params() * b + shape.layers * 2 * h * b
    # CPU, held by the process: its fixed part, the host copy of the largest segment being
    # recorded (the float embedding / head, or a quantized block) and the offloaded cache. The
    # finished segments are memory-mapped from their files (`mapped`: file pages, not held).
    largest_segment = max(shape.vocab * h * b, quantized // shape.layers)
    cpu_peak = int(PROCESS_BYTES[device.type] + largest_segment + (cache if offload_cache else 0))
    if device.type == "cpu":   # the device is the CPU: its memory holds the block and cache too
        cpu_peak += device_peak
    disk = 2 * (quantized + float_kept)
    rate = DEVICE_FLOPS[(device.type, dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32)]
    forward_flops = 2 * shape.block_params() * tokens * FORWARDS[cfg.calibration]
    method_flops = _method_flops(shape, cfg)
    read = checkpoint_bytes if checkpoint_bytes is not None else (shape.layers * shape.block_params()
                                                                    + shape.embedding_params()) * 2
    columns = sum(i for _, i in shape.shared_input_linears()) if cfg.calibration in GPTQ_METHODS else 0
    searched = _awq_candidates(cfg) * shape.block_params() * AWQ_CANDIDATE_BYTES_PER_PARAM / DEVICE_BYTES_PER_S[device.type]
    dispatch = n * FORWARDS[cfg.calibration] * SAMPLE_BLOCK_SECONDS
    seconds = (shape.layers * ((forward_flops + method_flops) / rate + columns * GPTQ_COLUMN_SECONDS[device.type]
                               + searched + dispatch)
               + HOST_SECONDS + read / DISK_BYTES_PER_S + (quantized + float_kept) / SEGMENT_WRITE_BYTES_PER_S)
    detail = {"samples": n, "seq_len": t, "layers": shape.layers, "block_params": shape.block_params(),
              "block_weight_bytes": block_weights, "cache_bytes": cache, "work_bytes": work,
              "stats_bytes": stats, "offload_cache": offload_cache, "quantized_bytes": quantized,
              "float_kept_bytes": float_kept, "mapped_bytes": quantized + float_kept}
    return Plan(cfg.calibration, device.type, device_peak, cpu_peak, disk, seconds, detail)


def _stats_bytes(shape: Shape, cfg: QuantConfig) -> int:
    """The method's statistics at their peak (awq+gptq: AWQ's rows are freed before GPTQ's Hessians)."""
    return max(_gptq_bytes(shape, cfg) if cfg.calibration in GPTQ_METHODS else 0,
               _awq_bytes(shape, cfg) if cfg.calibration in AWQ_METHODS else 0)


def _gptq_bytes(shape: Shape, cfg: QuantConfig) -> int:
    # float64 Hessians, one per input value: the whole block's, or with true-sequential stages
    # the largest stage's (one input each: q/k/v, o, gate/up, down)
    hessians = [i * i * 8 for _, i in shape.shared_input_linears()]
    held = max(hessians) if cfg.gptq_true_sequential else sum(hessians)
    o, i = max(shape.shared_input_linears(), key=lambda oi: oi[0] * oi[1] + oi[1] * oi[1])
    # W, Q, Err, result in float32; at the Cholesky step four float64 [in, in] matrices
    # besides the accumulator: the Hessian taken from it, GPTQ's working copy, H + λI and L
    workspace = 4 * o * i * 4 + 4 * i * i * 8
    return held + workspace


def _awq_bytes(shape: Shape, cfg: QuantConfig) -> int:
    inputs = [shape.hidden, shape.hidden, shape.heads * shape.head_dim, shape.ffn]
    rows = sum(cfg.awq_search_rows * i * 4 for i in inputs)
    o, i = max(shape.linears(), key=lambda oi: oi[0] * oi[1])
    return rows + 3 * o * i * 4 + cfg.awq_search_rows * o * 4


def _method_flops(shape: Shape, cfg: QuantConfig) -> float:
    flops = 0.0
    if cfg.calibration in GPTQ_METHODS:
        flops += sum(2 * o * i * i + i ** 3 for o, i in shape.shared_input_linears())
    return flops + _awq_candidates(cfg) * 2 * cfg.awq_search_rows * shape.block_params()


def _awq_candidates(cfg: QuantConfig) -> int:
    """Quantizations of each weight AWQ's searches try: the scale grid, and the clip grid."""
    if cfg.calibration not in AWQ_METHODS:
        return 0
    return (2 if cfg.awq_clip else 1) * cfg.awq_grid


def _quantized_bytes(shape: Shape, cfg: QuantConfig) -> int:
    bits = {"int4": 4, "nf4": 4, "int8": 8, "fp8": 8}.get(cfg.weight_dtype, 8)
    per_block = sum(o * i for o, i in shape.linears())
    groups = per_block / (cfg.group_size or per_block)
    scale = 2 if cfg.scale_precision in ("fp16", "bf16") else 4
    return int(shape.layers * (per_block * bits / 8 + groups * scale * (1 if cfg.symmetric else 2)))


def check_fits(plan: Plan, device_bytes: int | None, cpu_bytes: int | None, disk_free: int | None) -> None:
    """Refuse before any work when the plan exceeds what the machine has, with the numbers."""
    over = []
    for what, need, have in (("device memory", plan.peak_device_bytes, device_bytes),
                             ("CPU memory", plan.peak_cpu_bytes, cpu_bytes),
                             ("disk", plan.disk_bytes, disk_free)):
        if have is not None and need > have:
            over.append(f"{what}: needs ~{need / GIB:.2f} GiB, {have / GIB:.2f} GiB available")
    if over:
        hint = "" if plan.detail["offload_cache"] else "; offload_cache=True (--offload-cache) moves the " \
               f"{plan.detail['cache_bytes'] / GIB:.2f} GiB activation cache to CPU memory"
        raise ConfigError("the layer-wise compile cannot fit: " + "; ".join(over) + hint
                          + "; fewer calibration samples or a shorter seq_len also shrink it")


def machine_capacity(device: torch.device, work_dir: str | Path) -> tuple[int | None, int | None, int]:
    """(free device memory, available CPU memory, free disk at work_dir) in bytes."""
    import shutil
    device_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    cpu = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        if "MemAvailable" in fields:
            cpu = int(fields["MemAvailable"].split()[0]) * 1024
    probe = Path(work_dir)
    while not probe.exists():
        probe = probe.parent
    return device_free, cpu, shutil.disk_usage(probe).free
