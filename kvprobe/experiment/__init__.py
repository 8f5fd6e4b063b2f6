"""The experiment layer: one config run through capture -> probe -> (causal, reconstruct) -> sweep -> report.

`config` (in `kvprobe.config`) declares a study; `resolve` turns it into a model and
samples through the model-kind table (`kinds`); `capture` plans and captures every
condition; `pipeline` runs the stages; `rundir` keeps the experiment directory. The
`kvprobe` command is a thin layer over this package, and a study in Python uses it the
same way. Bad input raises `ExperimentError` (the command's exit code 2).
"""

from .. import lazy_exports

__all__ = [
    "ExperimentError",
    "ModelKind",
    "Plans",
    "capture_all",
    "check_out_dir",
    "check_store",
    "holm_corrected",
    "leakage_table",
    "load_model",
    "make_source",
    "model_kind",
    "open_run",
    "plan_all",
    "prepare_out_dir",
    "process_device",
    "record_model",
    "record_timing",
    "run_pipeline",
    "saved_reconstruction",
    "stage_probe",
    "stage_reconstruct",
    "stage_report",
    "stage_sweep",
    "start_run",
    "store_dir",
    "verify_run",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".capture": ("Plans", "capture_all", "plan_all"),
    ".errors": ("ExperimentError",),
    ".kinds": ("ModelKind", "model_kind"),
    ".pipeline": ("holm_corrected", "leakage_table", "run_pipeline", "stage_probe", "stage_report", "stage_sweep",
                  "start_run"),
    ".reconstruct": ("saved_reconstruction", "stage_reconstruct"),
    ".resolve": ("load_model", "make_source", "process_device"),
    ".rundir": ("check_out_dir", "check_store", "open_run", "prepare_out_dir", "record_model", "record_timing",
                "store_dir", "verify_run"),
})
