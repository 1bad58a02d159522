"""The pass lists a compile runs."""
from __future__ import annotations

from . import PIPELINE

# The guard measures on calibration sequences held back by compile(); QAT trains on its data.
NOT_IN_QAT = ("guard",)


def qat_pipelines(pipeline: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(prepare, export): PTQ's passes before convert plus fake_quant; then fold_fake_quant and
    PTQ's passes from convert on, so a QAT export is lowered exactly as PTQ lowers."""
    passes = [p for p in (pipeline or PIPELINE) if p not in NOT_IN_QAT]
    cut = passes.index("convert")
    return passes[:cut] + ["fake_quant"], ["fold_fake_quant"] + passes[cut:]
