"""Capture: KV states of chosen positions and layers, through one interface and three
backends (transformers, TransformerLens, nnsight), into an HDF5 store."""

from ..data.samples import SampleBatch, SampleSource
from ..memento.sites import site_positions
from .backends import get_backend
from .run import CapturePlan, model_dims, model_identity, plan_capture, run_capture
from .backend_helpers import gather_positions
from .spec import CaptureSpec

__all__ = [
    "CapturePlan",
    "CaptureSpec",
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
