"""Capture: KV states of chosen positions and layers, through one interface and three
backends (transformers, TransformerLens, nnsight), into an HDF5 store."""

from .. import lazy_exports
from ..errors import renamed

__all__ = [
    "CapturePlan",
    "CaptureConfig",
    "SampleBatch",
    "SampleSource",
    "gather_positions",
    "get_backend",
    "model_dims",
    "model_identity",
    "plan_capture",
    "run_capture",
    "site_positions",
    "store_meta",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "..data.samples": ("SampleBatch", "SampleSource"),
    "..memento.sites": ("site_positions",),
    ".backends": ("get_backend",),
    ".run": ("CapturePlan", "model_dims", "model_identity", "plan_capture", "run_capture", "store_meta"),
    ".backend_helpers": ("gather_positions",),
    ".spec": ("CaptureConfig",),
}, fallback=renamed(__name__, {"CaptureSpec": "CaptureConfig"}))  # the old names, for one release
