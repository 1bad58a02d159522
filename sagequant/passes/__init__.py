"""Passes, one file each; importing the package registers them. PIPELINE is the default order."""
from . import (annotate, awq, calibrate, canonicalize, convert, gptq, guard, insert_observers,  # noqa: F401
               kv_cache, kv_cache_quant, lower, mixed_precision, schedule, smoothquant)
from .manager import (PASSES, DumpIR, Instrument, Pass, PassContext, PassManager, PassResult,  # noqa: F401
                      PrintIRAfter, Timing, register_pass)

PIPELINE = ["canonicalize", "annotate", "mixed_precision", "smoothquant", "awq", "insert_observers",
            "calibrate", "gptq", "convert", "lower", "schedule", "guard"]

from . import fuse_norm_qdq  # noqa: F401,E402
# Last: accuracy checks and scheduler IR see one kernel per linear; the fusion is exact.
PIPELINE.append("fuse_norm_qdq")
# QAT only (passes/pipeline.qat_pipelines puts them around training): not in PIPELINE.
from . import fake_quant, fold_fake_quant  # noqa: F401,E402
