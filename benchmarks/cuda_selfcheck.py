"""Run sagequant.backends.cuda.selfcheck from a bare checkout (no pip install needed), on the GPU:

    PYTHONUNBUFFERED=1 python3 benchmarks/cuda_selfcheck.py            # ~1-2 minutes, mostly compiles
    python3 benchmarks/cuda_selfcheck.py --interpret                    # CPU, needs triton
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_bench_lib as lib  # noqa: E402

if __name__ == "__main__":
    lib.import_sagequant()
    from sagequant.backends.cuda import selfcheck  # noqa: E402
    sys.exit(selfcheck.main(sys.argv[1:]))
