"""qconvert: export low-bit, non-uniformly quantized QAT networks to ONNX, with parity checks."""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .errors import QConvertError
from .native import ops_library_path

__version__ = "0.1.0"

__all__ = ["Checkpoint", "QConvertError", "__version__", "load_checkpoint", "ops_library_path",
           "save_checkpoint"]
