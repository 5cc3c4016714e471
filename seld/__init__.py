"""Stereo-RCnet stereo SELD (DCASE 2025 Task 3) and its Ray-distributed study system."""

__version__ = "0.1.0"
