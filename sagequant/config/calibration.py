"""Calibration: the method, how much data it sees, and the options of the algorithms
(SmoothQuant, AWQ, GPTQ; each used only by the method that names it)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .checks import boolean, choice, fail, integer, names, normalise

CALIBRATIONS = {**names("minmax", "percentile", "smoothquant", "awq", "gptq", "smoothquant+awq", "awq+gptq",
                      "smoothquant+gptq"),
                "awq+smoothquant": "smoothquant+awq", "gptq+awq": "awq+gptq", "gptq+smoothquant": "smoothquant+gptq"}
# Which algorithms each method runs (awq+gptq: AWQ balances the weights, then GPTQ rounds them;
# smoothquant+gptq: SmoothQuant migrates activation outliers into the weights, then GPTQ rounds
# the smoothed weights on the smoothed inputs, llm-compressor's W8A8 recipe).
SMOOTHQUANT_METHODS = ("smoothquant", "smoothquant+awq", "smoothquant+gptq")
AWQ_METHODS = ("awq", "smoothquant+awq", "awq+gptq")
GPTQ_METHODS = ("gptq", "awq+gptq", "smoothquant+gptq")


AWQ_SCALE_LOSSES = names("linear", "module")
# QuantConfig.gptq_sink_weight's non-numeric value: rows weighted by the attention mass they receive
ATTENTION_MASS = "attention"


@dataclass(frozen=True)
class CalibrationConfig:
    calibration: str = "minmax"
    calibration_samples: int = 128
    calibration_seq_len: int = 512
    smoothquant_alpha: float | str = 0.5   # migration strength, or "auto" for a per-layer search
    awq_grid: int = 20                     # scale-ratio grid points of the AWQ search
    awq_clip: bool = True                  # AWQ's weight clipping search
    # Also search s = mean|x|^r / mean|ŵ|^(1-r). Off by default: on SmolLM2 W4A16 g128 it won the
    # per-linear objective on 34 of 90 groups yet gave ppl 41.35 vs 40.53 without (BENCHMARKS §2a).
    awq_duo_scaling: bool = False
    awq_search_rows: int = 2048            # calibration token rows the scale search runs on
    # Each calibration sequence's first position (the attention sink) counts as this many token
    # positions in AWQ's scale and clip search losses, all of them kept next to the rows sampled
    # past it (the gptq_sink_weight idea, on every balance group and linear). 1: the rows are
    # sampled evenly over all positions, the sink's among them (with 32 x 512 windows and 2048
    # rows each sink is one of its window's 64 rows: ~8 positions' worth). BENCHMARKS §2k.
    awq_sink_weight: float = 1.0
    # Where AWQ's scale search measures a group's error: "linear", each consumer linear's output;
    # "module", the output of the token-wise module the consumers feed (SwiGLU gate/up: the MLP's
    # down_proj output, as AutoAWQ / llm-compressor); groups with no such module stay "linear".
    awq_scale_loss: str = "linear"
    gptq_block_size: int = 128
    gptq_damp: float = 0.01                # dampening, as a fraction of mean(diag(H))
    gptq_act_order: bool = False
    # Every group's scale fixed from the weight before GPTQ's column loop (act-order always does
    # so); False: each group's scale from its error-updated columns when GPTQ reaches it, as the
    # GPTQ paper does. BENCHMARKS §2l.
    gptq_static_groups: bool = False
    # Quantize a block's linears stage by stage (q/k/v, o, gate/up, down), each stage's Hessians
    # observed after the earlier stages were quantized; False: one observation run per block.
    # Off by default: on SmolLM2 W4A16 it measured worse (g128 47.58 vs 46.72 one pass; g64 57.10,
    # BENCHMARKS §2c).
    gptq_true_sequential: bool = False
    # Leading positions of every calibration sequence left out of GPTQ's Hessians and AWQ's
    # statistics (the attention-sink token, whose massive activations dominate them: SmolLM2 layer
    # 11 down_proj input |x| 3091, 99.8% of its window's Σx²). Off by default: leaving it out made
    # GPTQ far worse on SmolLM2 W4A16 g128 (ppl +152% vs +48% RTN, BENCHMARKS §2c) — the sink's
    # own output must stay exact.
    sink_tokens: int = 0
    # GPTQ Hessian rows above this multiple of their batch's median energy count as rows of that
    # energy (calibration/gptq.py HessianAccumulator); None: unweighted. BENCHMARKS §2d.
    gptq_row_energy_cap: float | None = None
    # Each calibration sequence's first position (the attention sink) weighs as this many rows in
    # the GPTQ Hessians of the linears that read the attention input (q/k/v, found from the graph's
    # attention ops); 1: plain GPTQ; "attention": every row there weighs the attention mass its
    # position receives as a key (mean 1, the sink's found by the model). BENCHMARKS §2g.
    gptq_sink_weight: float | str = 1.0
    # The last N decoder blocks each keep GPTQ's rounding or round-to-nearest, whichever gives the
    # lower KL(float || model) at the logits on the sequences held back for the accuracy guard
    # (later blocks still float). GPTQ minimises each linear's output error, which cannot see how
    # the last blocks' errors meet the head (SmolLM2 block 28: 2.3x RTN's KL, BENCHMARKS §2h).
    # 0: every block keeps GPTQ's rounding.
    gptq_select_blocks: int = 0

    def __post_init__(self) -> None:
        alpha = self.smoothquant_alpha
        if alpha != "auto":
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
                raise fail("smoothquant_alpha", alpha, "is not supported", "a number in [0, 1] or 'auto'")
            alpha = float(alpha)
        damp = self.gptq_damp
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise fail("gptq_damp", damp, "is not supported", "a number in (0, 1), e.g. 0.01")
        cap = self.gptq_row_energy_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap >= 1):
            raise fail("gptq_row_energy_cap", cap, "is not supported",
                       "None or a number >= 1 (a multiple of the median row energy), e.g. 10")
        sink_w = self.gptq_sink_weight
        if isinstance(sink_w, str) and sink_w.strip().lower() == ATTENTION_MASS:
            sink_w = ATTENTION_MASS
        elif isinstance(sink_w, bool) or not isinstance(sink_w, (int, float)) or not (
                math.isfinite(sink_w) and sink_w >= 1):
            raise fail("gptq_sink_weight", sink_w, "is not supported",
                       f"a finite number >= 1 (1: plain GPTQ), e.g. 50, or {ATTENTION_MASS!r}")
        else:
            sink_w = float(sink_w)
        awq_sink = self.awq_sink_weight
        if isinstance(awq_sink, bool) or not isinstance(awq_sink, (int, float)) or not (
                math.isfinite(awq_sink) and awq_sink >= 1):
            raise fail("awq_sink_weight", awq_sink, "is not supported",
                       "a finite number >= 1 (1: the sink sampled like any position), e.g. 50")
        for name in ("awq_clip", "awq_duo_scaling", "gptq_act_order", "gptq_static_groups", "gptq_true_sequential"):
            boolean(name, getattr(self, name))
        normalise(self, calibration=choice("calibration", self.calibration, CALIBRATIONS),
                  calibration_samples=integer("calibration_samples", self.calibration_samples, 1),
                  calibration_seq_len=integer("calibration_seq_len", self.calibration_seq_len, 1),
                  smoothquant_alpha=alpha, gptq_damp=float(damp),
                  gptq_row_energy_cap=None if cap is None else float(cap), gptq_sink_weight=sink_w,
                  awq_sink_weight=float(awq_sink),
                  awq_scale_loss=choice("awq_scale_loss", self.awq_scale_loss, AWQ_SCALE_LOSSES),
                  awq_grid=integer("awq_grid", self.awq_grid, 2),
                  awq_search_rows=integer("awq_search_rows", self.awq_search_rows, 1),
                  gptq_block_size=integer("gptq_block_size", self.gptq_block_size, 1),
                  sink_tokens=integer("sink_tokens", self.sink_tokens, 0),
                  gptq_select_blocks=integer("gptq_select_blocks", self.gptq_select_blocks, 0))
        if self.gptq_sink_weight != 1 and self.sink_tokens:
            raise fail("gptq_sink_weight", self.gptq_sink_weight, f"cannot weight the sink position "
                       f"that sink_tokens={self.sink_tokens} leaves out of the Hessians",
                       "gptq_sink_weight=1 with sink_tokens > 0, or sink_tokens=0 with any "
                       "gptq_sink_weight >= 1")
        if self.awq_sink_weight != 1 and self.sink_tokens:
            raise fail("awq_sink_weight", self.awq_sink_weight, f"cannot weight the sink position "
                       f"that sink_tokens={self.sink_tokens} leaves out of AWQ's statistics",
                       "awq_sink_weight=1 with sink_tokens > 0, or sink_tokens=0 with any "
                       "awq_sink_weight >= 1")
