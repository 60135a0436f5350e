"""underpar: the most language model out of a fixed budget of time, bytes and compute."""

__version__ = "0.1.0"
