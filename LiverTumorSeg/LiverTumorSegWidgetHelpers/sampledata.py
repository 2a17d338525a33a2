"""The bundled synthetic sample CT, offered in Slicer's Sample Data module.

Imports nothing from Slicer at module level, so the registration can be tested outside
Slicer with a stand-in for the SampleData module.
"""

import hashlib
from pathlib import Path

CATEGORY = "LiverTumorSeg"
SAMPLE_NAME = "LiverTumorSegPhantom"


def registerSampleData(SampleData, iconPath):
    """Register the bundled phantom CT (synthetic, not patient data) with SampleData.

    ``SampleData`` is Slicer's SampleData module; ``iconPath`` the thumbnail. The file is
    offered by a ``file://`` address with its SHA-256, so SampleData verifies the copy
    it caches. Returns the sample's name, or None when the file is missing.
    """
    from LiverTumorSegLib.samples import SAMPLE_CT

    if not SAMPLE_CT.is_file():
        return None
    digest = hashlib.sha256(SAMPLE_CT.read_bytes()).hexdigest()
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=CATEGORY, sampleName=SAMPLE_NAME, thumbnailFileName=str(Path(iconPath)),
        uris=SAMPLE_CT.resolve().as_uri(), fileNames=SAMPLE_CT.name, nodeNames=SAMPLE_NAME,
        checksums=f"SHA256:{digest}", loadFileType="VolumeFile")
    return SAMPLE_NAME
