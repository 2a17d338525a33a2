"""Which torch releases the engine runs on, and which of them load pickled weights safely.

Imports nothing heavy: the Slicer module reads it before PyTorch is installed.
"""

from __future__ import annotations

#: The oldest torch the engine is tested on. 2.2.2 is also the newest release for Intel
#: macOS, which 3D Slicer's macOS build (x86_64, run through Rosetta on Apple Silicon)
#: can install, so a higher floor would shut those users out.
TORCH_MINIMUM = (2, 2)
#: Up to 2.5.1, ``torch.load(weights_only=True)`` could run code from a crafted file
#: (CVE-2025-32434). Older torch reads pickled (``.pt``) weights only from the bundled
#: model folders, which ship with this code; any model loads from safetensors weights.
TORCH_SAFE_PICKLE = (2, 6)


def release(version: str) -> tuple:
    """(major, minor) of a version string such as ``2.5.1+cu121``."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (2 - len(parts)))
