"""genderlens' own library, used by every service: wire schema, settings, stream helpers,
preprocessing, detectors and model definitions.

Importing ``shared`` (and its Redis/schema/settings modules) must never import torch: the capture and
viewer images do not ship it. Torch-backed modules (``shared.preprocess``, ``shared.models``,
``shared.detectors.torch_yunet``) import it at module level and are only imported by the inference
worker and the trainer.
"""

__version__ = "0.1.0"
