"""Passes, one file each; importing the package registers them. PIPELINE is the default order."""
from . import annotate, calibrate, canonicalize, convert, gptq, insert_observers, lower, schedule  # noqa: F401
from .manager import (PASSES, DumpIR, Instrument, Pass, PassContext, PassManager, PassResult,  # noqa: F401
                      PrintIRAfter, Timing, register_pass)

PIPELINE = ["canonicalize", "annotate", "insert_observers", "calibrate", "gptq", "convert", "lower",
            "schedule"]
