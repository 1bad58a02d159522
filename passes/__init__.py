"""Passes, one file each; importing the package registers them. PIPELINE is the default order."""
from . import (annotate, awq, calibrate, canonicalize, convert, gptq, insert_observers, lower,  # noqa: F401
               schedule, smoothquant)
from .manager import (PASSES, DumpIR, Instrument, Pass, PassContext, PassManager, PassResult,  # noqa: F401
                      PrintIRAfter, Timing, register_pass)

PIPELINE = ["canonicalize", "annotate", "smoothquant", "awq", "insert_observers", "calibrate", "gptq",
            "convert", "lower", "schedule"]
