"""Probes: predict each passcode digit from captured KV features, many probes at once.

Probes read arrays, never models or files. `fit_probes` fits a whole grid of
groups x digits in one batched PyTorch computation; `fit_sklearn` is the slow,
one-at-a-time scikit-learn reference for the linear probe.
"""

from .linear import LBFGSInfo, LinearConfig, LinearProbes, fit_linear_probes
from .mlp import MLPConfig, MLPInfo, MLPProbes, fit_mlp_probes, label_unique_holdout
from .trainer import ProbeFit, Standardizer, check_probe_inputs, fit_probes, fit_sklearn

__all__ = [
    "LBFGSInfo",
    "LinearConfig",
    "LinearProbes",
    "MLPConfig",
    "MLPInfo",
    "MLPProbes",
    "ProbeFit",
    "Standardizer",
    "check_probe_inputs",
    "fit_linear_probes",
    "fit_mlp_probes",
    "fit_probes",
    "fit_sklearn",
    "label_unique_holdout",
]
