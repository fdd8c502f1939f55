"""The lowbit model zoo (no torchvision): small-image CNNs and their trained checkpoints."""
from . import mobilenetv2, resnet, shufflenetv2  # noqa: F401  (registers the models)
from .registry import create_model, list_models, register_model
from .user import load_model
from .zoo import load_pretrained, pretrained_path

__all__ = ["create_model", "list_models", "register_model", "load_pretrained", "pretrained_path", "load_model"]
