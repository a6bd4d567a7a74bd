"""pathopeft: batch WSI processing, continual MIL and parameter-efficient fine-tuning for pathology.

Importing the package is cheap and side-effect free: no network, no GPU, no model construction.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
