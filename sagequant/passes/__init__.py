"""Passes, one file each, registered here in one place; pipeline.py builds the list a compile runs."""
from .manager import (PASSES, DumpIR, Instrument, Pass, PassContext, PassManager, PassResult,  # noqa: F401
                      PrintIRAfter, Timing, define_pass, register_passes)
from . import (annotate, awq, calibrate, canonicalize, convert, fake_quant, fold_fake_quant,  # noqa: E402
               fuse_norm_qdq, gptq, guard, insert_observers, kv_cache, kv_cache_quant, layerwise, lower,
               mixed_precision, qat_train, rotate, schedule, smoothquant)

register_passes(canonicalize.canonicalize, rotate.rotate, annotate.annotate, mixed_precision.mixed_precision,
                smoothquant.smoothquant, awq.awq, insert_observers.insert_observers,
                calibrate.calibrate, gptq.gptq, fake_quant.fake_quant, qat_train.qat_train,
                fold_fake_quant.fold_fake_quant, convert.convert, lower.lower, schedule.schedule,
                guard.guard, fuse_norm_qdq.fuse_norm_qdq, kv_cache.kv_cache,
                kv_cache_quant.kv_cache_quant, layerwise.layerwise)
