"""guard: the accuracy check every compile ends with.

On calibration sequences held back from calibration (`split_held_back`, called by compile) it
compares the float model with the compiled graph: KL(float || quantized) of the next-token
distributions, top-1 agreement, delta loss (quantized minus float mean next-token NLL, nats) and
every quantized layer's own output SQNR (evaluation/error_report.py). Past a bound
(QuantConfig.guard_bound: per-scheme defaults, overridable by guard_bounds) the compile fails with
an error naming the worst layers, unless QuantConfig.guard="report". The numbers are the pass's
stats, so report() and the saved artifact hold them either way.

It is a pass rather than a step of compile() so that it is timed, listed and stoppable like the
others, and so that it sees exactly the graph the pipeline produced.
"""
from __future__ import annotations

import math

import torch

from ..calibration.datasets import CalibrationDataError
from ..ir.graph import QuantGraph
from ..evaluation.error_report import layer_errors
from ..evaluation.metrics import PairedAccumulator
from .manager import PassContext, PassResult, define_pass
from ..errors import CompileError

MIN_TARGETS = 16  # fewer scored tokens measure sampling noise, not the quantization
WORST_LAYERS = 5  # layers named in the error and kept in the report


class AccuracyGuardError(CompileError):
    """The compiled model is further from the float model than the guard's bounds allow.
    `.result` holds every measured number (the same dict report() would have shown)."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def split_held_back(batches: list[torch.Tensor], cfg) -> tuple[list[torch.Tensor], list | None]:
    """(calibration batches, held-back batches): the last cfg.guard_samples batches are held back.
    None held back when the guard is off. Too little data for both is an error, not a skip."""
    if cfg.guard == "off":
        return batches, None
    k = cfg.guard_samples
    if not batches:
        raise CalibrationDataError("calibration data is empty: no batches to calibrate on")
    if len(batches) <= k:
        raise CalibrationDataError(
            f"calibration data has {len(batches)} sequence(s); the accuracy guard holds back the last "
            f"{k} (QuantConfig.guard_samples) and calibration needs at least one more: pass more "
            "data, lower guard_samples, or set QuantConfig.guard='off'")
    held = batches[-k:]
    targets = sum(b.shape[0] * (b.shape[1] - 1) for b in held)
    if targets < MIN_TARGETS:
        raise CalibrationDataError(
            f"the {k} held-back sequence(s) have {targets} next-token targets; the accuracy guard "
            f"needs at least {MIN_TARGETS} to measure anything: use longer sequences, raise "
            "QuantConfig.guard_samples, or set QuantConfig.guard='off'")
    return batches[:-k], held


@define_pass("guard", "compare float vs quantized on held-back data; fail past the accuracy bounds",
               requires=("lower",))
def guard(graph: QuantGraph, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    if ctx.held_back_batches is None or ctx.reference_model is None:
        raise ValueError("the guard needs held-back sequences and the float model in PassContext "
                         "(passes/pipeline.py leaves the pass out without them)")
    logits = LogitComparison()
    rows = layer_errors(graph, ctx.reference_model, ctx.held_back_batches, on_logits=logits.add,
                        desc="accuracy guard")
    result = {"mode": cfg.guard, "held_back": _describe(ctx), **logits.summary()}
    model_bounds = _model_bounds(cfg, {r["scheme"] for r in rows})
    result["bounds"] = model_bounds
    violations = _model_violations(result, model_bounds)
    bad_layers = [r for r in rows if not r["local_sqnr_db"] >= cfg.guard_bound("min_layer_sqnr_db", r["scheme"])]
    if bad_layers:
        violations.append(f"{len(bad_layers)} layer(s) below their scheme's min_layer_sqnr_db")
    result["worst_layers"] = [_layer_row(cfg, r) for r in rows[:WORST_LAYERS]]
    result["layers_below_bound"] = [r["layer"] for r in bad_layers]
    result["violations"] = violations
    result["passed"] = not violations
    if violations and cfg.guard == "enforce":
        raise AccuracyGuardError(_message(result, bad_layers or rows[:WORST_LAYERS], cfg), result)
    return PassResult(graph, False, result)


class LogitComparison:
    """Sums over every position of the held-back batches, in float64; standard errors (clustered
    by sequence) from the positions that have a next-token target."""

    def __init__(self):
        self.kl = self.agree = self.nll_float = self.nll_quant = 0.0
        self.positions = self.targets = 0
        self.paired = PairedAccumulator()

    def add(self, ids: torch.Tensor, float_logits: torch.Tensor, quant_logits: torch.Tensor) -> None:
        lp = torch.log_softmax(float_logits.double(), -1)
        lq = torch.log_softmax(quant_logits.double(), -1)
        self.kl += float((lp.exp() * (lp - lq)).sum())
        self.agree += float((lp.argmax(-1) == lq.argmax(-1)).sum())
        self.positions += lp.shape[0] * lp.shape[1]
        nxt = ids[:, 1:, None]
        self.nll_float -= float(lp[:, :-1].gather(-1, nxt).sum())
        self.nll_quant -= float(lq[:, :-1].gather(-1, nxt).sum())
        self.targets += nxt.numel()
        self.paired.add(float_logits[:, :-1], quant_logits[:, :-1], ids[:, 1:])

    def summary(self) -> dict:
        float_loss, quant_loss = self.nll_float / self.targets, self.nll_quant / self.targets
        paired = self.paired.summary()
        return {"kl": self.kl / self.positions, "kl_se": paired["kl_se"],
                "top1_agreement": self.agree / self.positions, "top1_flip_se": paired["flip_rate_se"],
                "float_loss": float_loss, "quantized_loss": quant_loss,
                "delta_loss": quant_loss - float_loss, "delta_loss_se": paired["nll_delta_se"]}


def _describe(ctx: PassContext) -> dict:
    held, calib = ctx.held_back_batches, ctx.calibration_batches or []
    return {"split": f"the last {len(held)} calibration sequence(s), not used for calibration",
            "sequences": len(held), "tokens": sum(b.numel() for b in held),
            "calibration_sequences": len(calib)}


def _model_bounds(cfg, schemes: set[str]) -> dict:
    """Model-level bounds: the loosest over the schemes present, so a mixed model is held to the
    bound of its lowest-precision layers."""
    if not schemes:
        return {}
    loosest = {"max_kl": max, "max_delta_loss": max, "min_top1": min}
    return {k: pick(cfg.guard_bound(k, s) for s in schemes) for k, pick in loosest.items()}


def _model_violations(result: dict, bounds: dict) -> list[str]:
    checks = [("kl", "max_kl", lambda v, b: v <= b), ("delta_loss", "max_delta_loss", lambda v, b: v <= b),
              ("top1_agreement", "min_top1", lambda v, b: v >= b)]
    # Written as "not within" so that a NaN measurement counts as a violation.
    return [f"{key} {result[key]:.4g} outside {bound} {bounds[bound]:.4g}"
            for key, bound, ok in checks if bound in bounds and not ok(result[key], bounds[bound])]


def _layer_row(cfg, r: dict) -> dict:
    return {"layer": r["layer"], "scheme": r["scheme"], "local_sqnr_db": r["local_sqnr_db"],
            "accumulated_sqnr_db": r["accumulated_sqnr_db"],
            "min_layer_sqnr_db": cfg.guard_bound("min_layer_sqnr_db", r["scheme"])}


def _message(result: dict, layers: list[dict], cfg) -> str:
    named = "; ".join(f"{r['layer']} ({r['scheme']}): local SQNR {r['local_sqnr_db']:.2f} dB "
                      f"(bound {cfg.guard_bound('min_layer_sqnr_db', r['scheme']):g}), accumulated "
                      f"{r['accumulated_sqnr_db']:.2f} dB" for r in layers[:WORST_LAYERS])
    held = result["held_back"]
    return (f"accuracy guard failed on {held['sequences']} held-back sequence(s), {held['tokens']} "
            f"tokens: {'; '.join(result['violations'])}. KL {result['kl']:.4g}, top-1 agreement "
            f"{result['top1_agreement']:.3f}, delta loss {result['delta_loss']:.4g} nats "
            f"(ppl x{_exp(result['delta_loss']):.3g}). Worst layers: {named}. To accept this model "
            "set QuantConfig.guard='report' (the numbers then go into report()['accuracy_guard']), "
            "or change QuantConfig.guard_bounds")


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0)) if math.isfinite(x) else x
