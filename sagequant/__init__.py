"""sagequant: a quantization compiler for large language models."""
from .api import (CompiledModel, QuantizationManager, QuantizationProtocol, compile,  # noqa: F401
                  load)
from .artifact import ArtifactError  # noqa: F401
from .calibration.data_sources import load_dataset  # noqa: F401
from .config import ConfigError, QuantConfig  # noqa: F401
from .frontends.models import load_model, resolve_model  # noqa: F401
from .ir.kv_plan import KVQuantPlan, build_kv_plan  # noqa: F401
from .ir.trace import TraceError  # noqa: F401

__version__ = "0.1.0"
