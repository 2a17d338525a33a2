"""GUI helpers of the LiverTumorSeg Slicer module (Qt and the Slicer application).

Kept out of the module file so that stays thin, and out of LiverTumorSegLib, which
never imports a front end: ``parameters`` (the parameter node), ``panel`` (the module
panel's behaviour), ``dependencies`` (finding models, installing PyTorch) and
``sampledata`` (the bundled sample CT in the Sample Data module).
"""
