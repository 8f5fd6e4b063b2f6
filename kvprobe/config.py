"""Experiment configs: one YAML or TOML file describes a whole study, validated on load.

    name: toy-reproduction
    seed: 0
    model:   {kind: toy, checkpoint: final}
    data:    {kind: toy, n_samples: 50000, target_block: 1}
    capture: {layers: [0, 1, 2, 3], offsets: [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8]}
    conditions:
      memento: {keep_last_n_blocks: 0}
      restart: {keep_last_n_blocks: 0, restart_mode: true}   # the fork's: delimiters evicted too
    probe:   {kinds: [linear, mlp], seeds: 3}

Every field is checked (pydantic, unknown keys refused) and errors name the field, e.g.
`config field 'capture.layers.1': Input should be a valid integer`. Files are read
with safe loaders only (`yaml.safe_load`, `tomllib`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from .analysis import ProbeSettings
from .capture.spec import BACKENDS, COMPRESSIONS, POOLINGS, STORAGE_DTYPES, CaptureSpec
from .memento.masks import MaskConfig
from .memento.sites import SITES
from .errors import KVProbeError

if TYPE_CHECKING:
    from .causal import CausalSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "ExperimentConfig", "apply_overrides", "key_value_arg", "load_config", "parse_config"]


# the channel pairs a report shows when both were captured, by mask name (MaskConfig.name): (a, b) -> a - b
STANDARD_COMPARISONS = (("memento", "restart"), ("memento", "restart-delims-visible"),
                        ("restart-delims-visible", "restart"))


class ConfigError(KVProbeError, ValueError):
    """A config file is missing, unreadable, or has an invalid field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    kind: Literal["toy", "hf"] = "toy"
    checkpoint: str = "final"  # toy: a shipped name or a directory; hf: a local directory or hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    trust_remote_code: bool = False
    # hf only: fetch a hub id's files from the network (default: local files and the local cache only)
    allow_download: bool = False
    # hf models larger than one GPU: spread the layers over the visible devices (accelerate);
    # `device` then places only the probes. max_memory caps each device, e.g. {"0": "70GiB", "cpu": "100GiB"}
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | None = None
    max_memory: dict[str, str] | None = None

    @model_validator(mode="after")
    def _device_map_is_for_hf(self) -> "ModelSection":
        if self.device_map is not None and self.kind != "hf":
            raise ValueError("config field 'model.device_map': only hf models can be spread over devices")
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("config field 'model.max_memory': needs model.device_map")
        if self.device_map is not None and self.attn_implementation == "flex_attention":
            raise ValueError("config field 'model.device_map': flex_attention's block mask lives on one device; "
                             "use attn_implementation 'sdpa' with a device map")
        return self


class DataSection(_Strict):
    kind: Literal["toy", "traces"] = "toy"
    n_samples: int = Field(5000, ge=2)
    target_block: int = Field(1, ge=0)
    traces: str | None = None  # JSONL (data pipeline) or .txt (generated) traces
    # traces only: how data.traces is read. auto: .jsonl the data pipeline's records, else generated text;
    # openmementos: the OpenMementos columns (.parquet/.jsonl), or the hub id microsoft/OpenMementos
    # with model.allow_download (kvprobe.data.openmementos)
    traces_format: Literal["auto", "openmementos"] = "auto"
    tokenizer: str | None = None  # defaults to the model's checkpoint
    template: str = "The secret passcode is {passcode}."
    # traces only: how the prompt is wrapped before <think> (kvprobe.data.chat): auto (the vLLM fork's
    # memento_nosys template for ChatML tokenizers, else none), memento, tokenizer, none, or a .jinja path
    chat_template: str = "auto"
    where: str | int = "start"  # start, end, middle, or a sentence index
    # traces only: a trace that carries the ids a server generated it with is fed those ("served"),
    # or rendered and tokenized kvprobe's way ("retokenize"); kvprobe.data.trace_source
    token_ids: Literal["served", "retokenize"] = "served"
    # traces only: traces with templated or content-free mementos, or avg_final_score 0
    # (kvprobe.data.quality), are refused (an error), dropped or kept (both with a warning)
    summary_check: Literal["refuse", "drop", "keep"] = "refuse"
    # toy only: passcodes with this digit sum (22: every memento text is the same whatever the
    # passcode, so masked mementos read the KV channel alone; chance becomes the exact baseline)
    digit_sum: int | None = Field(None, ge=0, le=45)
    shared_background: bool = False  # toy only: the same digits outside the target block in every sample

    @model_validator(mode="after")
    def _text_controls_are_toy_only(self) -> "DataSection":
        if self.kind != "toy" and (self.digit_sum is not None or self.shared_background):
            raise ValueError("config fields 'data.digit_sum' and 'data.shared_background' are for data.kind 'toy'")
        if self.kind == "toy" and self.chat_template != "auto":
            raise ValueError("config field 'data.chat_template': the toy has no prompt to wrap; it is for data.kind "
                             "'traces'")
        for name, default in (("token_ids", "served"), ("summary_check", "refuse"), ("traces_format", "auto")):
            if self.kind == "toy" and getattr(self, name) != default:
                raise ValueError(f"config field 'data.{name}': the toy has no traces; it is for data.kind 'traces'")
        return self


def section_from(spec: type, name: str, types: dict[str, Any], *, exclude: tuple[str, ...] = (),
                 defaults: dict[str, Any] | None = None) -> type[BaseModel]:
    """A config section declared once: the fields and defaults of the frozen dataclass `spec`.

    `types` adds what pydantic checks per field, so a bad value names its config field (the
    allowed values are the spec's own tuples); `exclude` drops fields another section fills
    (the capture's mask and target block); `defaults` sets a default the spec does not have.
    """
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, f.default)
        if default is dataclasses.MISSING:
            raise TypeError(f"{spec.__name__}.{f.name} has no default: give one in `defaults`")
        fields[f.name] = (types[f.name], default)
    return create_model(name, __base__=_Strict, __module__=__name__, **fields)


_Positive = Annotated[int, Field(ge=1)]
_NonEmpty = Field(min_length=1)  # a list field that must name at least one thing
CaptureSection = section_from(
    CaptureSpec, "CaptureSection",
    {"layers": Annotated[tuple[int, ...], _NonEmpty], "offsets": Annotated[tuple[int, ...], _NonEmpty],
     "sites": Annotated[tuple[Literal[SITES], ...], _NonEmpty],  # type: ignore[valid-type]
     "kinds": Annotated[tuple[Literal["k", "v"], ...], _NonEmpty],
     "pooling": Annotated[tuple[Literal[POOLINGS], ...], _NonEmpty],  # type: ignore[valid-type]
     "max_tokens": _Positive, "dtype": Literal[STORAGE_DTYPES], "batch_size": _Positive,  # type: ignore[valid-type]
     "shard_size": _Positive, "backend": Literal[BACKENDS], "compression": Literal[COMPRESSIONS]},  # type: ignore[valid-type]
    exclude=("target_block", "mask"),  # the source holds the target block (data.target_block); the conditions the masks
    defaults={"layers": (0, 1, 2, 3)},  # every layer of the toy (the spec's layers depend on the model)
)
MaskSection = section_from(
    MaskConfig, "MaskSection",
    {"keep_last_n_blocks": Annotated[int, Field(ge=-1)], "mask_delimiters": bool | None, "restart_mode": bool,
     "evict_before_summary_end": bool, "restart_sees_kept_blocks": bool, "keep_last_block_for_answer": bool},
    exclude=("prefill_causal",))  # a mask for the generator and direct calls: capture gives no prompt lengths yet


_PROBE = ProbeSettings()  # the probe section's defaults are the Python defaults: one set


class ProbeSection(_Strict):
    """How to probe, as `kvprobe.analysis.ProbeSettings` (its defaults), plus what only a config
    says: per-condition shuffled controls and the MLP's own cell subset."""

    kinds: Annotated[tuple[Literal["linear", "mlp"], ...], _NonEmpty] = _PROBE.kinds
    seeds: int = Field(_PROBE.seeds, ge=1)  # MLP initialisations; the convex linear probe is fitted once
    val_fraction: float = Field(_PROBE.val_fraction, gt=0, lt=1)
    pooling: Literal[POOLINGS] | None = None  # type: ignore[valid-type]  # None: capture.pooling's first
    shuffled_control: bool | tuple[str, ...] = _PROBE.shuffled_control  # True: every condition; or the conditions
    layers: Annotated[tuple[int, ...], _NonEmpty] | None = _PROBE.layers  # cells to probe; None: all captured
    offsets: Annotated[tuple[int, ...], _NonEmpty] | None = _PROBE.offsets
    mlp_layers: Annotated[tuple[int, ...], _NonEmpty] | None = None  # the MLP's cells, a subset to save time; None: same as above
    mlp_offsets: Annotated[tuple[int, ...], _NonEmpty] | None = None
    mlp_sites: tuple[Literal[SITES], ...] | None = None  # type: ignore[valid-type]
    n_boot: int = Field(_PROBE.n_boot, ge=100)
    linear_l2: float = Field(_PROBE.linear.l2, gt=0)  # L2 on weights, mean-loss scale (scikit-learn C = 1 / (l2 * N))
    linear_tol: float = Field(_PROBE.linear.tol, gt=0)  # stop when max |gradient| <= tol (1e-4 moves accuracy < 1 pp)
    mlp_max_epochs: int = Field(_PROBE.mlp.max_epochs, ge=1)
    # probe strength chosen per cell on an inner label-unique split of the training passcodes;
    # a one-value grid is a fixed strength. linear_l2 without linear_l2_grid means the grid [linear_l2].
    linear_l2_grid: tuple[Annotated[float, Field(gt=0)], ...] = Field(_PROBE.linear_l2_grid, min_length=1)
    mlp_l2_grid: tuple[Annotated[float, Field(gt=0)], ...] | None = Field(_PROBE.mlp_l2_grid, min_length=1)
    inner_fraction: float = Field(_PROBE.inner_fraction, gt=0, lt=1)  # share of training passcodes held out
    # where a cell's best strength is on the grid's edge, try a decade further until interior or at
    # kvprobe.probes.L2_BOUNDS (a choice left at a bound is flagged on its row); false keeps the grid
    extend_l2_grid: bool = _PROBE.extend_grid

    @model_validator(mode="before")
    @classmethod
    def _fixed_l2_is_a_one_value_grid(cls, data: Any) -> Any:
        """linear_l2 alone fixes the strength; with linear_l2_grid present (a resolved config) the grid rules."""
        if isinstance(data, dict) and "linear_l2" in data and "linear_l2_grid" not in data:
            data = {**data, "linear_l2_grid": [data["linear_l2"]]}
        return data


class SweepSection(_Strict):
    """Leakage across training checkpoints (toy): capture + linear probe per checkpoint."""

    checkpoints: tuple[str, ...] = ()  # toy checkpoint names or dirs, in training order; empty: no sweep
    n_samples: int = Field(10000, ge=100)
    layers: Annotated[tuple[int, ...], _NonEmpty] = (3,)  # the highest is followed: only it is captured
    offsets: tuple[int, ...] = (-1, 0, 1)  # the smallest positive one is the sweep's masked cell
    task_samples: int = Field(2000, ge=100)

    @field_validator("offsets")
    @classmethod
    def _has_masked(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not any(o > 0 for o in v):
            raise ValueError(f"the sweep follows masked leakage: give at least one offset > 0, got {list(v)}")
        return v

    def masked_offset(self) -> int:
        """The masked offset whose accuracy the sweep follows (+1 unless it was left out)."""
        return min(o for o in self.offsets if o > 0)


class ReportSection(_Strict):
    paper: Literal["toy", "none"] = "none"  # put the paper's numbers beside ours
    # paired differences (a, b) -> a - b; None: the standard pairs among the conditions, or
    # else the first condition against each other one
    comparisons: tuple[tuple[str, str], ...] | None = None


class CausalSection(_Strict):
    """Does the model use what leaks? KV interchange and channel ablation on the probe's cells
    (kvprobe.causal); the stage runs when `layers` is given."""

    layers: Annotated[tuple[int, ...], _NonEmpty] | None = None  # None: no causal stage
    offsets: Annotated[tuple[int, ...], _NonEmpty] = (0, 1, 2)
    sites: Annotated[tuple[Literal[SITES], ...], _NonEmpty] = ("memento",)  # type: ignore[valid-type]
    condition: str | None = None  # the mask the model runs under and the store the reader is fit on; None: the first
    ablate_with: MaskSection = MaskSection(keep_last_n_blocks=0, mask_delimiters=True, restart_mode=True)
    n_samples: int = Field(500, ge=2)  # samples after the probes' (data.n_samples onward): never seen by a probe
    batch_size: int = Field(100, ge=2)
    read_offset: int | None = 1  # the interchange's probe reads this offset (None: no probe read-out)
    read_layer: int | None = None  # ... at this layer (None: the last captured layer)


class ExperimentConfig(_Strict):
    """A whole study: model, samples, capture, mask conditions, probes."""

    name: str = "experiment"
    seed: int = 0
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    capture: CaptureSection = CaptureSection()
    conditions: dict[str, MaskSection] = {"memento": MaskSection()}
    probe: ProbeSection = ProbeSection()
    sweep: SweepSection = SweepSection()
    report: ReportSection = ReportSection()
    causal: CausalSection = CausalSection()

    @field_validator("conditions")
    @classmethod
    def _names(cls, v: dict[str, MaskSection]) -> dict[str, MaskSection]:
        if not v:
            raise ValueError("at least one condition is needed")
        for name in v:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"condition name {name!r} must be letters, digits, '-' or '_'")
            try:
                MaskConfig(**v[name].model_dump())
            except ValueError as e:  # a combination of options the mask does not define
                raise ValueError(f"condition {name!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _probe_cells_are_captured(self) -> "ExperimentConfig":
        c, p = self.capture, self.probe

        def check(field: str, wanted: tuple | None, have: tuple, what: str) -> None:
            missing = [w for w in (wanted or ()) if w not in have]
            if missing:
                raise ValueError(f"config field '{field}': {missing} not in {what} {list(have)}")

        if p.pooling is None:  # the probes read the capture's first pooling
            object.__setattr__(self, "probe", p.model_copy(update={"pooling": c.pooling[0]}))
            p = self.probe
        check("probe.pooling", (p.pooling,), c.pooling, "capture.pooling")
        check("probe.layers", p.layers, c.layers, "capture.layers")
        check("probe.offsets", p.offsets, c.offsets, "capture.offsets")
        check("probe.mlp_layers", p.mlp_layers, c.layers, "capture.layers")
        check("probe.mlp_offsets", p.mlp_offsets, c.offsets, "capture.offsets")
        check("probe.mlp_sites", p.mlp_sites, c.sites, "capture.sites")
        if not isinstance(p.shuffled_control, bool):
            check("probe.shuffled_control", p.shuffled_control, tuple(self.conditions), "conditions")
        k = self.causal
        if k.layers is not None:
            check("causal.layers", k.layers, c.layers, "capture.layers (the causal map sits beside the probe map)")
            check("causal.offsets", k.offsets, c.offsets, "capture.offsets")
            check("causal.sites", k.sites, c.sites, "capture.sites")
            check("causal.condition", (k.condition,) if k.condition else None, tuple(self.conditions), "conditions")
            check("causal.read_offset", (k.read_offset,) if k.read_offset is not None else None, c.offsets,
                  "capture.offsets")
            check("causal.read_layer", (k.read_layer,) if k.read_layer is not None else None, c.layers,
                  "capture.layers")
        for a, b in self.report.comparisons or ():
            check("report.comparisons", (a, b), tuple(self.conditions), "conditions")
            if a == b:
                raise ValueError(f"config field 'report.comparisons': {[a, b]} compares a condition with itself")
        return self

    def comparisons(self) -> tuple[tuple[str, str], ...]:
        """The paired differences the report shows: report.comparisons, or the defaults.

        Defaults, read from what each condition's mask is (MaskConfig.name), whatever the
        conditions are called: the standard channel pairs (memento - restart, memento -
        restart-delims-visible, restart-delims-visible - restart) among the conditions; a config with
        none of those compares its first condition with each other one.
        """
        if self.report.comparisons is not None:
            return self.report.comparisons
        names = tuple(self.conditions)
        by_mask: dict[str, str] = {}
        for name in names:
            by_mask.setdefault(MaskConfig(**self.conditions[name].model_dump()).name, name)
        standard = tuple((by_mask[a], by_mask[b]) for a, b in STANDARD_COMPARISONS if a in by_mask and b in by_mask)
        return standard or tuple((names[0], b) for b in names[1:])

    def causal_spec(self) -> "CausalSpec | None":
        """The causal stage's spec (None when the config asks for none)."""
        from .causal import CausalSpec

        k = self.causal
        if k.layers is None:
            return None
        condition = k.condition or next(iter(self.conditions))
        return CausalSpec(layers=k.layers, offsets=k.offsets, sites=k.sites, pooling=self.probe.pooling,
                          mask=MaskConfig(**self.conditions[condition].model_dump()),
                          ablate_with=MaskConfig(**k.ablate_with.model_dump()), n_samples=k.n_samples,
                          batch_size=k.batch_size, backend=self.capture.backend, n_boot=self.probe.n_boot)

    def capture_spec(self, condition: str) -> CaptureSpec:
        """The capture spec of one condition."""
        c = self.capture
        return CaptureSpec(
            layers=c.layers, offsets=c.offsets, sites=c.sites, kinds=c.kinds,
            pooling=c.pooling, max_tokens=c.max_tokens, dtype=c.dtype, batch_size=c.batch_size,
            shard_size=c.shard_size, backend=c.backend, compression=c.compression,
            mask=MaskConfig(**self.conditions[condition].model_dump()),
        )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    extra = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    if not err["loc"]:  # a check across fields names its fields itself
        return err["msg"].removeprefix("Value error, ") + extra
    where = ".".join(str(p) for p in err["loc"])
    return f"config field '{where}': {err['msg']}{extra}"


def parse_config(data: Any, source: str = "config") -> ExperimentConfig:
    """Validate a mapping as an ExperimentConfig; ConfigError names the first bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_first_error(e)}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a .yaml/.yml/.toml/.json config with safe loaders, apply dotted overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {path.suffix!r} (use .yaml, .toml or .json)")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"{path}: malformed {path.suffix[1:].upper()}: {' '.join(first[:2])}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return parse_config(apply_overrides(data, overrides), str(path))


def key_value_arg(text: str) -> tuple[str, Any]:
    """argparse type for KEY=VALUE options passed through to a library (TrainingArguments,
    vllm.LLM): the value is read as JSON when it parses, else kept as a string."""
    import argparse

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set dotted fields ('data.n_samples': 2000) in a config mapping, in place; returns it."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        if not all(parents + [leaf]):
            raise ConfigError(f"--set {dotted!r}: an empty field name")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"config field '{where}': is a value ({node!r}), it has no field {parents[i + 1] if i + 1 < len(parents) else leaf!r} to set")
        node[leaf] = value
    return data
