"""Passes, one file each, registered here in one place; pipeline.py builds the list a compile runs."""
from .manager import (PASSES, DumpIR, Instrument, Pass, PassContext, PassManager, PassResult,  # noqa: F401
                      PrintIRAfter, Timing, register_pass)
from . import (annotate, awq, calibrate, canonicalize, convert, fake_quant, fold_fake_quant,  # noqa: F401,E402
               fuse_norm_qdq, gptq, guard, insert_observers, kv_cache, kv_cache_quant, lower,
               mixed_precision, qat_train, schedule, smoothquant)
