"""napari-unetquant: quantization-aware training and low-bit fixed-point U-Nets for medical
image segmentation, as a napari plugin and a command-line tool.

The core (configs, quantizers, model, data, training) never imports Qt, magicgui or napari.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-unetquant")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
