"""lowbit: low-bit (8 to 1 bit) quantization of PyTorch CNNs, with real integer export.

Messages go to the ``logging`` hierarchy under ``"lowbit"`` (``lowbit.api``, ``lowbit.train``,
``lowbit.qat.engine``, ...); the library adds no handler but a ``NullHandler``, so an application
shows them with ``logging.basicConfig(level=logging.INFO)`` or its own handlers. Warnings about the
caller's input (a layer kind left in float, an untraceable model) stay ``warnings.warn``.
"""
import logging as _logging

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

from .allocate import allocate_bits
from .api import export, integer_model, load, methods, quantize
from .config import QuantConfig
from .errors import LowbitError, LowbitFileError
from .models import create_model, list_models, load_pretrained, register_model
from .ptq.registry import register_method
from .qat import QatConfig, qat, qat_methods
from .record import QuantRecord, record_of
from .sensitivity import SensitivityReport, sensitivity
from .summary import Summary, summary

__version__ = "0.1.0"
__all__ = ["export", "integer_model", "load", "methods", "quantize", "QuantConfig", "LowbitError", "LowbitFileError",
           "create_model", "list_models", "load_pretrained", "register_model", "register_method", "qat", "qat_methods",
           "QatConfig", "QuantRecord", "record_of", "summary", "Summary", "sensitivity", "SensitivityReport", "allocate_bits", "__version__"]
