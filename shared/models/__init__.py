"""Classifier architectures (registry) and the model artifact format (``shared.models.artifact``)."""

from shared.models.archs import ARCHITECTURES, build_model, register_arch

__all__ = ["ARCHITECTURES", "build_model", "register_arch"]
