"""lowbit: low-bit (8 to 1 bit) quantization of PyTorch CNNs, with real integer export."""
from .allocate import allocate_bits
from .api import export, integer_model, load, methods, quantize
from .config import QuantConfig
from .errors import LowbitError, LowbitFileError
from .models import create_model, list_models, load_pretrained, register_model
from .ptq.registry import register_method
from .qat import QatConfig, qat, qat_methods
from .sensitivity import SensitivityReport, sensitivity
from .summary import Summary, summary

__version__ = "0.1.0"
__all__ = ["export", "integer_model", "load", "methods", "quantize", "QuantConfig", "LowbitError", "LowbitFileError",
           "create_model", "list_models", "load_pretrained", "register_model", "register_method", "qat", "qat_methods",
           "QatConfig", "summary", "Summary", "sensitivity", "SensitivityReport", "allocate_bits", "__version__"]
