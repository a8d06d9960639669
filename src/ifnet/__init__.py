"""IFNet: chest X-ray report generation toolkit.

The importable library lives in the sub-packages (data, iec, labeler, metrics, layers, models,
decoding); the command-line apps live in ``ifnet.cli``.
"""

__version__ = "0.1.0"
