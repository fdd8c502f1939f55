"""Datasets: Fashion-MNIST, users' image folders, calibration sampling."""
from .calib import as_calibration_tensor, read_calibration, sample_calibration
from .fashion_mnist import load_fashion_mnist
from .folder import ImageFolder, load_image_folder

__all__ = ["as_calibration_tensor", "read_calibration", "sample_calibration", "load_fashion_mnist",
           "ImageFolder", "load_image_folder"]
