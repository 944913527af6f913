"""PromiseSegment core: ProMISe (frozen SAM + APM + IPS) for medical images. Never imports slicer/qt/vtk."""

__version__ = "0.1.0"
