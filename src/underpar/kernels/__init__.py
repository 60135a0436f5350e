"""Triton kernels, each with a pure-torch reference it must match."""

from underpar.kernels.softcap_ce import softcap_cross_entropy

__all__ = ["softcap_cross_entropy"]
