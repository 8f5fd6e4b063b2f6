"""Probes: predict each passcode digit from captured KV features, many probes at once.

Probes read arrays, never models or files. `fit_probes` fits a whole grid of
groups x digits in one batched PyTorch computation; `fit_sklearn` is the slow,
one-at-a-time scikit-learn reference for the linear probe. `fit_selected` chooses
the L2 strength per group on an inner label-unique split of the training data.
`fit_mlp_replicas` trains an MLP cell's seeds and its shuffled-label control in one run. The
options (`LinearConfig`, `MLPConfig`, `ProbeConfig`, and the reconstruction probes' `ReconstructionConfig`)
are in `config`, which needs no torch.
"""

from .. import lazy_exports

__all__ = [
    "DEFAULT_INNER_FRACTION",
    "DEFAULT_LINEAR_L2_GRID",
    "L2_BOUNDS",
    "DecoderConfig",
    "ReconstructionConfig",
    "SpanDecoder",
    "fit_span_decoder",
    "StrengthSelection",
    "fit_at_strengths",
    "fit_selected",
    "inner_split",
    "normalise_grid",
    "select_strength",
    "shared_moments",
    "strength_path",
    "FeatureMoments",
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
    "flush_denormals",
    "fit_mlp_replicas",
    "fit_probes",
    "fit_sklearn",
    "group_generators",
    "label_unique_holdout",
    "linear_in_raw_units",
    "still_improving_at_limit",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".config": ("DEFAULT_INNER_FRACTION", "DEFAULT_LINEAR_L2_GRID", "DecoderConfig", "LinearConfig", "MLPConfig",
                "ReconstructionConfig", "normalise_grid"),
    ".decoder": ("SpanDecoder", "fit_span_decoder"),
    ".linear": ("LBFGSInfo", "LinearProbes", "fit_linear_probes"),
    ".mlp": ("MLPInfo", "MLPProbes", "fit_mlp_probes", "flush_denormals", "group_generators",
             "label_unique_holdout"),
    ".selection": ("L2_BOUNDS", "StrengthSelection", "fit_at_strengths", "fit_selected", "inner_split",
                   "select_strength", "shared_moments", "strength_path"),
    ".trainer": ("FeatureMoments", "ProbeFit", "Standardizer", "check_probe_inputs", "fit_mlp_replicas", "fit_probes",
                 "fit_sklearn", "linear_in_raw_units", "still_improving_at_limit"),
})
