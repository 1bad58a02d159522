"""Run the Triton kernels on CPU tensors through Triton's interpreter, for tests and the
benchmark's --smoke mode: checks kernel logic without a GPU (times nothing, and the
interpreter's fp8 casts and bf16 arithmetic are not the GPU's: use fp16 activations there).

Call before the kernel modules are imported: `triton.jit` decides at decoration time.
"""
from __future__ import annotations

import os


def enable_triton_interpreter() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.interpreter as interp
    if getattr(interp, "_sagequant_index_patch", False):
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        # The interpreter keeps scalars as 1-element arrays; numpy >= 2.4 refuses int() of
        # those, which breaks `range(start, stop)` over program-id arithmetic.
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    interp._sagequant_index_patch = True
