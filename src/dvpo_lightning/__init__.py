"""DVPO and RLHF baselines on PyTorch Lightning."""

__version__ = "0.1.0"
