"""Capture: KV states of chosen positions and layers, through one interface and three
backends (transformers, TransformerLens, nnsight), into an HDF5 store."""

from ..data.samples import SampleBatch, SampleSource
from ..memento.sites import site_positions
from .backends import get_backend
from .run import CapturePlan, model_dims, model_identity, plan_capture, run_capture
from .backend_helpers import gather_positions
from .spec import CaptureConfig
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
]


__getattr__ = renamed(__name__, {"CaptureSpec": "CaptureConfig"})  # the old names, for one release
