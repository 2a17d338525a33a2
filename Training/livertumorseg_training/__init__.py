"""LiverTumorSeg training: data, cache, augmentation, Lightning loop, export, evaluation.

The network, the preprocessing and the inference come from ``LiverTumorSegLib``; this
package owns everything else. It may import Lightning and TorchIO; the engine never
does.
"""

from __future__ import annotations

__all__ = ["DatasetError"]

from .errors import DatasetError
