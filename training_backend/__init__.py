"""GUI-free back end of napari-lesionseg: project store, I/O, models, methods, trainer,
active learning, metrics and the ``lesionseg`` CLI. Never imports napari, Qt or magicgui."""

__version__ = "0.1.0"
