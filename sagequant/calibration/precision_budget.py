"""Choose one precision per layer from a measured sensitivity table to meet a budget.

Every layer starts at its base option (the cheapest rung of its ladder). Layers are then raised,
one step at a time, by the move that buys the most loss per extra byte ("greedy by efficiency",
the usual multiple-choice-knapsack heuristic):
  bits budget   raise while a move with a positive loss gain still fits in the byte budget;
  loss target   raise until the summed per-layer delta loss is at or below the target.
A budget that cannot be met raises BudgetError with the best achievable value.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError


class BudgetError(ConfigError):
    """The mixed-precision target cannot be met by any choice of the allowed precisions."""


@dataclass(frozen=True)
class Choice:
    layer: str
    label: str             # the option chosen, e.g. "W8A16" or "float"
    delta_loss: float      # measured delta loss of the layer alone at that option
    base_delta_loss: float  # ... at the base option
    bytes: int


def choose_precisions(rows: list[dict], ladder: list[str], *, bits_per_weight: float | None = None,
                      max_delta_loss: float | None = None) -> list[Choice]:
    """rows: layer_sensitivity rows; ladder: option labels cheapest first (ladder[0] is the base).
    Exactly one of bits_per_weight / max_delta_loss."""
    if (bits_per_weight is None) == (max_delta_loss is None):
        raise ValueError("choose_precisions needs exactly one of bits_per_weight, max_delta_loss")
    for r in rows:
        missing = [label for label in ladder if label not in r["options"]]
        if missing:
            raise ValueError(f"sensitivity row of {r['layer']} has no option {missing[0]!r}")
    level = [0] * len(rows)
    params = sum(r["params"] for r in rows)

    def opt(i: int, k: int) -> dict:
        return rows[i]["options"][ladder[k]]

    total_bytes = sum(opt(i, 0)["bytes"] for i in range(len(rows)))
    predicted = sum(opt(i, 0)["delta_loss"] for i in range(len(rows)))
    budget = bits_per_weight * params / 8 if bits_per_weight is not None else None
    if budget is not None and total_bytes > budget:
        raise BudgetError(
            f"QuantConfig.target_bits_per_weight={bits_per_weight:g} cannot be met: every layer at "
            f"its cheapest allowed precision ({ladder[0]}) already needs "
            f"{8 * total_bytes / params:.3f} bits per weight, the best achievable")
    while budget is not None or predicted > max_delta_loss:
        room = budget - total_bytes if budget is not None else None
        best = _best_move(rows, ladder, level, opt, room)
        if best is None:
            break
        i, k = best
        total_bytes += opt(i, k)["bytes"] - opt(i, level[i])["bytes"]
        predicted += opt(i, k)["delta_loss"] - opt(i, level[i])["delta_loss"]
        level[i] = k
    if max_delta_loss is not None and predicted > max_delta_loss:
        raise BudgetError(
            f"QuantConfig.target_max_delta_loss={max_delta_loss:g} cannot be met with precisions "
            f"{', '.join(ladder)}: the best achievable summed per-layer delta loss is "
            f"{predicted:.4g} nats (add 'float' to QuantConfig.precision_upgrades, or relax the target)")
    return [Choice(r["layer"], ladder[level[i]], opt(i, level[i])["delta_loss"], opt(i, 0)["delta_loss"],
                   opt(i, level[i])["bytes"]) for i, r in enumerate(rows)]


def _best_move(rows, ladder, level, opt, room):
    """(layer index, new level) with the largest loss gain per extra byte; None if no move helps
    (or, under a byte budget, none that helps fits)."""
    best, best_eff = None, 0.0
    for i in range(len(rows)):
        here = opt(i, level[i])
        for k in range(level[i] + 1, len(ladder)):
            gain = here["delta_loss"] - opt(i, k)["delta_loss"]
            cost = opt(i, k)["bytes"] - here["bytes"]
            if gain <= 0 or cost <= 0 or (room is not None and cost > room):
                continue
            if gain / cost > best_eff:
                best, best_eff = (i, k), gain / cost
    return best
