"""layerwise: calibrate and quantize a model one decoder block at a time on one device, with the
weights onloaded from where they stay (a safetensors checkpoint directory or CPU memory).

For each segment (prologue, block 0 .. block B-1, epilogue) the block's weights come to the
device, every calibration stage the config asks for runs on that block only — SmoothQuant,
AWQ scale and clip search, GPTQ, activation observers — its linears are converted to their
stored form, the block runs once more over all samples (the next block calibrates on the
quantized block's output, as GPTQ's sequential rounding needs), and the block's final tensors
are written to `work_dir/segment_NNN.safetensors` with its calibration records. Then its device
copies are freed (tensors of KEEP_RESIDENT_BYTES and more become meta placeholders). Peak
device memory is one block, its statistics (Hessians, sampled rows) and the inter-block
activation cache (in CPU memory with offload_cache).

Resume: a segment with a record in work_dir is restored from it instead of calibrated; the
activation cache is rebuilt by running the restored block, so a killed run started again with
the same arguments continues and yields the same tensors bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..calibration.onload import graph_weight_names, offload, onload, return_freed_memory
from ..calibration.sequential import SequentialRunner
from ..calibration.stats import segment_input_stats
from ..config import QuantConfig
from ..config.calibration import AWQ_METHODS, GPTQ_METHODS, SMOOTHQUANT_METHODS
from ..errors import ConfigError, UnsupportedError
from ..ir.annotations import CalibrationRecord
from ..ir.graph import QuantGraph
from ..ir.patterns import balance_groups
from ..ir.trace import retarget_device
from ..progress import phase
from ..calibration.distributed import merge_hessian, merge_observer, shard, world
from ..calibration.smoothquant import search_alpha, smoothing_scales
from .calibrate import RANGE_ONLY_BATCHES
from .convert import is_convertible, quantized_tensors, rewrite_linear
from .fold_scales import fold_group_scales
from .awq import balance_and_clip
from .awq_output import ATTENTION_SEQUENCES, SegmentRuns
from .gptq import observe_hessians, quantize_linears, sink_weighted_linears, stages
from .insert_observers import input_observer
from .manager import PassContext, PassResult, define_pass
from .smoothquant import SEARCH_ACT_SPEC, SEARCH_ROWS

METHODS = ("minmax", "percentile", *dict.fromkeys(SMOOTHQUANT_METHODS + AWQ_METHODS + GPTQ_METHODS))
# Smaller tensors (norm weights, static input scales) stay in CPU memory after their block; larger
# ones live only in the segment files (memory-mapped once the block loop is done), so what the
# process itself holds does not grow with depth.
KEEP_RESIDENT_BYTES = 64 << 10
RECORD_VERSION = 1


def check_layerwise_config(cfg: QuantConfig) -> None:
    if cfg.calibration not in METHODS:
        raise UnsupportedError(f"layer-wise compile supports calibration in {METHODS}, "
                               f"not {cfg.calibration!r}")
    if cfg.guard != "off":
        raise UnsupportedError("the accuracy guard compares the whole float and quantized models; a "
                               "layer-wise compile never holds the whole float model: set guard='off'")
    if cfg.target_bits_per_weight is not None or cfg.target_max_delta_loss is not None:
        raise UnsupportedError("mixed precision by budget measures whole-model sensitivity; it is not "
                               "supported layer-wise (per-layer overrides are)")
    if cfg.gptq_select_blocks:
        raise UnsupportedError("gptq_select_blocks compares the whole model's logits with the float "
                               "model's on held-back sequences; not layer-wise (set it to 0)")
    if cfg.enable_qat or cfg.draft_mode:
        raise UnsupportedError("enable_qat / draft_mode compile the whole model; not layer-wise")


class LayerwiseCompile:
    def __init__(self, graph: QuantGraph, cfg: QuantConfig, batches: list[torch.Tensor], source,
                 device: torch.device, dtype: torch.dtype, work_dir: str | Path,
                 offload_cache: bool = False, fingerprint: dict | None = None):
        check_layerwise_config(cfg)
        if not batches:
            raise ConfigError("a layer-wise compile needs calibration data (calibration_data=)")
        self.graph, self.cfg, self.source = graph, cfg, source
        self.device, self.dtype = torch.device(device), dtype
        self.work_dir = Path(work_dir)
        self.runner = SequentialRunner(graph, self.device, offload_cache)
        self.rank, self.world_size = world()
        self.all_batches, self.batches = batches, shard(batches)   # data parallel: this rank's share
        self.groups = balance_groups(graph) if cfg.calibration in SMOOTHQUANT_METHODS + AWQ_METHODS else []
        self.sink_readers = sink_weighted_linears(graph, cfg) if cfg.calibration in GPTQ_METHODS else {}
        if cfg.calibration in AWQ_METHODS and cfg.awq_scale_loss == "module" and self.world_size > 1:
            raise UnsupportedError("awq_scale_loss='module' runs the attention on one rank's sequences; "
                                   "not data parallel (use awq_scale_loss='linear' or one process)")
        self.stats = {"segments": len(self.runner.segments), "restored": 0, "calibrated": 0,
                      "quantized_layers": 0, "onloaded_bytes": 0}
        self._peak_before = 0   # device peak of the phases before the last peak-counter reset
        self._check_work_dir(fingerprint or {})

    # ---- resume records ---------------------------------------------------------------------
    def _check_work_dir(self, fingerprint: dict) -> None:
        ids = hashlib.sha256(b"".join(b.cpu().numpy().tobytes() for b in self.all_batches)).hexdigest()
        self.fingerprint = {"version": RECORD_VERSION, "config": self.cfg.to_dict(),
                            "calibration_ids_sha256": ids, "dtype": str(self.dtype), **fingerprint}
        if self.rank != 0:   # rank 0 checks and writes the work dir's settings
            self.restorable = self._finished_segments()
            return _barrier()
        try:
            self._claim_work_dir()
            self.restorable = self._finished_segments()
        finally:   # the other ranks wait for the check, also when it fails
            if self.world_size > 1:
                _barrier()

    def _finished_segments(self) -> set[int]:
        """Segments a previous run recorded, read before any rank writes a record of this run: a
        segment without collectives (the prologue, say) that rank 0 finishes and records first
        must not look restorable to a slower rank, or the ranks' barriers fall out of step."""
        return {seg for seg in range(len(self.runner.segments)) if self._record(seg)[1].is_file()}

    def _claim_work_dir(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / "run.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != json.loads(json.dumps(self.fingerprint)):
                changed = sorted(k for k in set(old) | set(self.fingerprint)
                                 if old.get(k) != json.loads(json.dumps(self.fingerprint.get(k))))
                raise ConfigError(f"work_dir {str(self.work_dir)!r} holds a run with other settings "
                                  f"({', '.join(changed)} differ); use another work_dir or delete it")
        else:
            _atomic_write(path, json.dumps(self.fingerprint, indent=1).encode())

    def _record(self, seg: int) -> tuple[Path, Path]:
        return (self.work_dir / f"segment_{seg:03d}.safetensors", self.work_dir / f"segment_{seg:03d}.json")

    def _save_segment(self, seg: int, names: list[str], layer_stats: dict) -> None:
        """Rank 0 writes (every rank holds the same tensors); the others wait for it."""
        if self.rank != 0:
            return _barrier()
        tensors_path, meta_path = self._record(seg)
        tensors = {n: self.graph.attr(n).detach().contiguous().cpu() for n in names}
        tmp = tensors_path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, tensors_path)
        records = {self.graph.annotation(n).layer: {k: r.to_dict() for k, r in
                                                     self.graph.annotation(n).calibration.items()}
                   for n in self.runner.segments[seg] if self.graph.annotation(n) is not None}
        # The json is written last: its presence is what marks the segment done.
        _atomic_write(meta_path, json.dumps({"names": names, "records": records,
                                             "stats": layer_stats}, indent=1).encode())
        if self.world_size > 1:
            _barrier()

    def _restore_segment(self, seg: int) -> bool:
        tensors_path, meta_path = self._record(seg)
        if seg not in self.restorable:
            return False
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensors_path), device=str(self.device))
        before = set(self.graph.graph.nodes)
        for node in [n for n in self.runner.segments[seg] if is_convertible(self.graph, n)]:
            ann = self.graph.annotation(node)
            self.graph.update_annotation(node, calibration={
                k: CalibrationRecord.from_dict(r) for k, r in meta["records"][ann.layer].items()})
            prefix = node.args[1].target.removesuffix(".weight")
            rewrite_linear(self.graph, node, {k[len(prefix) + 1:]: v for k, v in tensors.items()
                                              if k.startswith(prefix + ".") and k != node.args[1].target})
            self.stats["quantized_layers"] += 1
        for name in meta["names"]:
            self.graph.set_attr(name, tensors[name])
        self.runner.adopt(seg, [n for n in self.graph.graph.nodes if n not in before])
        for k, v in meta["stats"].items():
            self.stats[k] = self.stats.get(k, 0) + v
        return True

    # ---- one segment ------------------------------------------------------------------------
    def _calibrate_segment(self, seg: int, caches: list[dict]) -> dict:
        graph, cfg, runner = self.graph, self.cfg, self.runner
        nodes = runner.segments[seg]
        members = set(nodes)
        linears = [n for n in nodes if is_convertible(graph, n)]
        out = {}
        if not linears:
            return out
        groups = [g for g in self.groups if g.consumers[0] in members]
        if cfg.calibration in SMOOTHQUANT_METHODS and groups:
            out.update(self._smoothquant(seg, caches, groups))
        if cfg.calibration in AWQ_METHODS:
            out.update(self._awq(seg, caches, linears, groups))
        if cfg.calibration in GPTQ_METHODS:  # awq+gptq: GPTQ's Hessians see the balanced inputs
            out.update(self._gptq(seg, caches, linears))
        self._observe_inputs(seg, caches, linears)
        before = set(graph.graph.nodes)
        for node in linears:
            rewrite_linear(graph, node, quantized_tensors(graph, node, cfg))
        runner.adopt(seg, [n for n in graph.graph.nodes if n not in before])
        out["quantized_layers"] = len(linears)
        return out

    def _smoothquant(self, seg, caches, groups) -> dict:
        graph, cfg = self.graph, self.cfg
        auto = cfg.smoothquant_alpha == "auto"
        stats = segment_input_stats(self.runner, seg, caches, [g.consumers[0] for g in groups],
                                    SEARCH_ROWS if auto else 0, len(self.all_batches))
        for group in groups:
            st = stats[group.consumers[0]]
            weights = [graph.attr(c.args[1]) for c in group.consumers]
            alpha = cfg.smoothquant_alpha
            if auto:
                ann = graph.annotation(group.consumers[0])
                alpha, _ = search_alpha(st.rows, weights, ann.input_spec or SEARCH_ACT_SPEC,
                                        ann.weight_spec, act_absmax=st.channel_absmax)
            fold_group_scales(graph, group, smoothing_scales(st.channel_absmax, weights, alpha))
        return {"smoothquant_groups": len(groups)}

    def _awq(self, seg, caches, linears, groups) -> dict:
        graph, cfg = self.graph, self.cfg
        first_reader = {}
        for n in linears:
            first_reader.setdefault(n.args[0], n)
        raw = segment_input_stats(self.runner, seg, caches, list(first_reader.values()), cfg.awq_search_rows,
                                  len(self.all_batches), sink_tokens=cfg.sink_tokens,
                                  keep_sink=cfg.awq_sink_weight != 1)
        stats = {inp: raw[node] for inp, node in first_reader.items()}
        runs = (SegmentRuns(self.runner, {seg: caches[:ATTENTION_SEQUENCES]}) if cfg.awq_scale_loss == "module"
                else None)
        result = balance_and_clip(graph, groups, linears, stats, cfg, runs=runs)
        return {"awq_" + k if k == "groups" else k: v for k, v in result.items()}

    def _gptq(self, seg, caches, linears) -> dict:
        graph = self.graph
        stats = {"layers": 0, "rtn_error": 0.0, "gptq_error": 0.0}
        # As the gptq pass: true-sequential stages see the earlier stages already quantized.
        for stage in stages(linears) if self.cfg.gptq_true_sequential else [linears]:
            shared, hooks = observe_hessians(graph, stage, self.cfg, self.sink_readers)
            self.runner.run_segment(seg, caches, hooks, commit=False)
            while shared:
                nodes, acc = shared.pop(0)
                quantize_linears(graph, nodes, merge_hessian(acc) if self.world_size > 1 else acc,
                                 self.cfg, stats)
        return {"gptq_rtn_error": stats["rtn_error"], "gptq_error": stats["gptq_error"]}

    def _observe_inputs(self, seg, caches, linears) -> None:
        """Calibration records of the linears' inputs; every sample when a static activation scale
        depends on them, else the first RANGE_ONLY_BATCHES (as the calibrate pass does)."""
        graph = self.graph
        static = any(graph.annotation(n).input_spec is not None and not graph.annotation(n).input_spec.dynamic
                     for n in linears)
        observers = {n: input_observer(graph.annotation(n), self.cfg) for n in linears}
        # the first RANGE_ONLY_BATCHES samples overall: this rank's among them
        first = len(range(self.rank, RANGE_ONLY_BATCHES, self.world_size))
        self.runner.run_segment(seg, caches if static else caches[:first],
                                {n: (lambda node, args, out: observers[node](args[0])) for n in linears},
                                commit=False)
        for node, obs in observers.items():
            if self.world_size > 1:
                merge_observer(obs)
            ann = graph.annotation(node)
            graph.update_annotation(node, calibration={**ann.calibration,
                                                       "input": obs.record("input", ann.clip_ratio)})

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        runner, graph = self.runner, self.graph
        retarget_device(graph.gm, self.device)
        caches = runner.start(self.batches, run_prologue=False)
        started = time.perf_counter()
        with phase("layer-wise", len(runner.segments), unit="block") as progress:
            for seg in range(len(runner.segments)):
                self._run_segment(seg, caches)
                progress.advance(note=runner.segment_name(seg))
        self.stats["seconds"] = round(time.perf_counter() - started, 3)
        if self.device.type == "cuda":
            self.stats["peak_device_bytes"] = max(self._peak_before, torch.cuda.max_memory_allocated(self.device))
        retarget_device(graph.gm, torch.device("cpu"))
        graph.recompile()
        return self.stats

    def _run_segment(self, seg: int, caches: list[dict]) -> None:
        runner, graph = self.runner, self.graph
        names = onloaded = graph_weight_names(graph, runner.segments[seg])
        if self._restore_segment(seg):
            self.stats["restored"] += 1
        else:
            with self._timed("onload"):
                self.stats["onloaded_bytes"] += onload(graph, names, self.source, self.device, self.dtype)
            with self._timed("calibrate"):
                layer_stats = self._calibrate_segment(seg, caches)
            self.stats["calibrated"] += 1
            for k, v in layer_stats.items():
                self.stats[k] = self.stats.get(k, 0) + v
            names = graph_weight_names(graph, runner.segments[seg])
            with self._timed("save"):
                self._save_segment(seg, names, layer_stats)
        with self._timed("forward"):
            if seg + 1 < len(runner.segments):
                runner.run_segment(seg, caches)
        with self._timed("offload"):
            # The float weights convert replaced are read by nothing now: they leave the device too.
            offload(graph, list(dict.fromkeys(onloaded + graph_weight_names(graph, runner.segments[seg]))),
                    KEEP_RESIDENT_BYTES)
            return_freed_memory()
        self._segment_done(seg)

    @contextmanager
    def _timed(self, phase_name: str):
        """Seconds per phase of the block loop, summed over blocks (device work finished inside),
        and on a GPU each phase's peak allocated bytes over all blocks (what the plan must bound)."""
        cuda = self.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        if cuda:   # the peak so far is kept apart, so the run's overall peak survives the reset
            self._peak_before = max(self._peak_before, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        sync()
        seconds = self.stats.setdefault("phase_seconds", {})
        seconds[phase_name] = round(seconds.get(phase_name, 0.0) + time.perf_counter() - start, 3)
        if cuda:
            peaks = self.stats.setdefault("phase_peak_device_bytes", {})
            peaks[phase_name] = max(peaks.get(phase_name, 0), torch.cuda.max_memory_allocated(self.device))

    def _segment_done(self, seg: int) -> None:
        """Called after each finished segment (a test injects a crash here)."""

    def load_final_tensors(self) -> None:
        """Bring every placeholder back from the segment files, in CPU memory, for the artifact."""
        wanted = {n.target for n in self.graph.graph.nodes
                  if n.op == "get_attr" and self.graph.attr(n).device.type == "meta"}
        for seg in range(len(self.runner.segments)):
            path = self._record(seg)[0]
            names = [n for n in json.loads(self._record(seg)[1].read_text())["names"] if n in wanted]
            if names:
                tensors = load_file(str(path))
                for n in names:
                    self.graph.set_attr(n, tensors[n])


def _barrier() -> None:
    import torch.distributed as dist
    dist.barrier()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class LayerwiseRun:
    """What the layerwise pass needs besides the graph and the calibration batches."""

    source: object                # where the weights stay (calibration/onload: checkpoint or state)
    device: torch.device
    dtype: torch.dtype
    work_dir: Path
    offload_cache: bool
    fingerprint: dict             # identifies the run, so a resume refuses another model's records
    plan: dict                    # calibration/plan.py's estimate, recorded with the statistics


@define_pass("layerwise", "calibrate and quantize one decoder block at a time on the chosen device",
             requires=("annotate",), provides=("insert_observers", "calibrate", "gptq", "convert"))
def layerwise(graph: QuantGraph, ctx: PassContext) -> PassResult:
    run = ctx.layerwise
    if not isinstance(run, LayerwiseRun):
        raise ValueError("the layerwise pass needs PassContext.layerwise=LayerwiseRun(...); "
                         "compile(device=...) builds it")
    work = LayerwiseCompile(graph, ctx.config, ctx.calibration_batches, run.source, run.device, run.dtype,
                            run.work_dir, run.offload_cache, fingerprint=run.fingerprint)
    stats = work.run()
    work.load_final_tensors()
    graph.gm.to("cpu")
    return PassResult(graph, True, {**stats, "plan": run.plan})

