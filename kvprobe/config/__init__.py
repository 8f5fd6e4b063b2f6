"""Experiment configs: one YAML or TOML file describes a whole study, validated on load.

    name: toy-reproduction
    seed: 0
    model:   {kind: toy, checkpoint: final}
    data:    {kind: toy, n_samples: 50000, target_block: 1}
    capture: {layers: [0, 1, 2, 3], offsets: [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8]}
    conditions:
      memento: {keep_last_n_blocks: 0}
      restart: {keep_last_n_blocks: 0, restart_mode: true}   # the fork's: delimiters evicted too
    probe:   {families: [linear, mlp], seeds: 3, mlp: {max_epochs: 300}}

Every field is checked (pydantic, unknown keys refused) and errors name the field, e.g.
`config field 'capture.layers.1': Input should be a valid integer`. Files are read
with safe loaders only (PyYAML's SafeLoader, `tomllib`, `json`), and a key
given twice in one mapping is refused. Types are strict: `seed: true` is not the integer 1,
`n_samples: 300.0` not 300.

The capture, mask, probe and causal sections are generated from the library's dataclasses
(`CaptureConfig`, `MaskConfig`, `ProbeConfig` with its `LinearConfig`/`MLPConfig` as nested
sections, `CausalConfig`): a key is the field's name and its default the field's default.
`ExperimentConfig` translates the file once, into those dataclasses (`capture_spec`,
`probe_settings`, `causal_spec`). Keys renamed since are read for one release
(`RENAMED_KEYS`) with a DeprecationWarning. The generated sections are in `kvprobe.config.sections`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..capture.spec import CaptureConfig
from ..causal.config import CausalConfig
from ..errors import KVProbeError
from ..files import DuplicateKeyError, UniqueKeyLoader
from ..grid import LINEAR, MEMENTO, MLP, Cell
from ..memento.config import MaskConfig
from ..probes.config import ProbeConfig, ReconstructionConfig
from .sections import (FILLED_ELSEWHERE, RENAMED_KEYS, CaptureSection, CausalSection, MaskSection, ProbeSection,
                       ReconstructSection, _NonEmpty, _Strict, renamed_keys, spec_from)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["FILLED_ELSEWHERE", "RENAMED_KEYS", "ConfigError", "ExperimentConfig", "apply_overrides",
           "load_config", "parse_config"]


# the channel pairs a report shows when both were captured, by mask name (MaskConfig.name, read off the masks:
# memento, restart, restart-delims-visible): (a, b) -> a - b
_MEMENTO, _RESTART, _VISIBLE = (MaskConfig().name, MaskConfig(restart_mode=True).name,
                                MaskConfig(mask_delimiters=False, restart_mode=True).name)
STANDARD_COMPARISONS = ((_MEMENTO, _RESTART), (_MEMENTO, _VISIBLE), (_VISIBLE, _RESTART))


DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hip|hpu|mtia|xla|meta|privateuseone)(:\d+)?")
"""The device strings `model.device` takes: torch's device types a model is placed on, with an optional index."""


class ConfigError(KVProbeError, ValueError):
    """A config file is missing, unreadable, or has an invalid field."""


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

    @field_validator("device")
    @classmethod
    def _a_device(cls, v: str) -> str:
        """A torch device string ('cpu', 'cuda', 'cuda:1', 'mps', ...), checked here without importing torch."""
        if not DEVICE.fullmatch(v):
            raise ValueError(f"not a device: {v!r} (e.g. cpu, cuda, cuda:1, mps)")
        return v

    @model_validator(mode="after")
    def _device_map_is_for_hf(self) -> "ModelSection":
        for name in ("trust_remote_code", "allow_download"):  # read by hf loading only
            if getattr(self, name) and self.kind != "hf":
                raise ValueError(f"config field 'model.{name}': model.kind {self.kind!r} does not read it; it is for "
                                 "model.kind 'hf'")
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
    def _fields_of_the_kind(self) -> "DataSection":
        """A field that only the other data.kind reads (DATA_KIND_FIELDS) is refused unless it is left at
        its default: the toy reads no traces, traces no digit sums."""
        for name, kind in DATA_KIND_FIELDS.items():
            if self.kind != kind and getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"config field 'data.{name}': data.kind {self.kind!r} does not read it; it is for "
                                 f"data.kind {kind!r}")
        return self


# the data fields only one data.kind reads, with that kind (`DataSection._fields_of_the_kind`)
DATA_KIND_FIELDS = {"digit_sum": "toy", "shared_background": "toy", "traces": "traces", "tokenizer": "traces",
                    "template": "traces", "where": "traces", "chat_template": "traces", "token_ids": "traces",
                    "summary_check": "traces", "traces_format": "traces"}


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


class ExperimentConfig(_Strict):
    """A whole study: model, samples, capture, mask conditions, probes."""

    name: str = "experiment"
    seed: int = 0
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    capture: CaptureSection = CaptureSection()
    conditions: dict[str, MaskSection] = {_MEMENTO: MaskSection()}
    probe: ProbeSection = ProbeSection()
    sweep: SweepSection = SweepSection()
    report: ReportSection = ReportSection()
    causal: CausalSection = CausalSection()
    reconstruct: ReconstructSection = ReconstructSection()

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        return renamed_keys(data) if isinstance(data, dict) else data

    @field_validator("conditions")
    @classmethod
    def _names(cls, v: dict[str, MaskSection]) -> dict[str, MaskSection]:
        if not v:
            raise ValueError("at least one condition is needed")
        for name in v:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"condition name {name!r} must be letters, digits, '-' or '_'")
            try:
                spec_from(MaskConfig, v[name])
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
        check("probe.sites", p.sites, c.sites, "capture.sites")
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
        check("reconstruct.layers", self.reconstruct.layers, c.layers, "capture.layers")
        check("reconstruct.offsets", self.reconstruct.offsets, c.offsets, "capture.offsets")
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
            by_mask.setdefault(self.mask(name).name, name)
        standard = tuple((by_mask[a], by_mask[b]) for a, b in STANDARD_COMPARISONS if a in by_mask and b in by_mask)
        return standard or tuple((names[0], b) for b in names[1:])

    # the config translated once, here: the stages take these and never reshape the config themselves

    def mask(self, condition: str) -> MaskConfig:
        """The mask of one condition."""
        return spec_from(MaskConfig, self.conditions[condition])

    def capture_spec(self, condition: str) -> CaptureConfig:
        """The capture spec of one condition."""
        return spec_from(CaptureConfig, self.capture, mask=self.mask(condition))

    def probe_settings(self, family: str, condition: str | None = None) -> ProbeConfig:
        """How to fit one probe family on one condition's store: probe.*, the MLP's own cells
        (probe.mlp_layers, mlp_offsets, mlp_sites), the condition's shuffled control, seed, model.device."""
        p = self.probe
        cells = {"layers": p.layers, "offsets": p.offsets, "sites": p.sites}
        if family == MLP:
            own = {"layers": p.mlp_layers, "offsets": p.mlp_offsets, "sites": p.mlp_sites}
            cells = {k: v if own[k] is None else own[k] for k, v in cells.items()}
        shuffled = p.shuffled_control if isinstance(p.shuffled_control, bool) else condition in p.shuffled_control
        return spec_from(ProbeConfig, p, families=(family,), shuffled_control=shuffled, split_seed=self.seed,
                         device=self.model.device, **cells)

    def sweep_specs(self) -> tuple[CaptureConfig, ProbeConfig]:
        """The sweep's capture (the first condition's, at the sweep's highest layer and offsets) and linear probe."""
        spec = dataclasses.replace(self.capture_spec(next(iter(self.conditions))), layers=(max(self.sweep.layers),),
                                   offsets=self.sweep.offsets)
        return spec, dataclasses.replace(self.probe_settings(LINEAR), shuffled_control=False, layers=None, offsets=None)

    def reconstruction_spec(self, condition: str | None = None) -> ReconstructionConfig:
        """The reconstruction probes on one condition's store: reconstruct.* (its own linear strength grid,
        `l2_grid`), with the probe section's split, pooling and family settings, one seed of each of
        reconstruct.families, at reconstruct.layers and offsets (None: the probe section's cells)."""
        r = self.reconstruct
        probe = dataclasses.replace(self.probe_settings(LINEAR, condition), families=r.families, seeds=1,
                                    shuffled_control=False, layers=r.layers or self.probe.layers,
                                    offsets=r.offsets or self.probe.offsets)
        return spec_from(ReconstructionConfig, r, probe=probe)

    def causal_condition(self) -> str:
        """The condition the causal stage runs under and fits its reader on: causal.condition, or the first."""
        return self.causal.condition or next(iter(self.conditions))

    def causal_spec(self) -> CausalConfig | None:
        """The causal stage's spec (None when the config asks for none)."""
        if self.causal.layers is None:
            return None
        return spec_from(CausalConfig, self.causal, pooling=self.probe.pooling, mask=self.mask(self.causal_condition()),
                         backend=self.capture.backend, n_boot=self.probe.n_boot)

    def causal_read_cell(self) -> Cell | None:
        """The cell the interchange's probe reads (None: no read-out): causal.read_offset at causal.read_layer
        (None: the last captured layer), at the probes' pooling."""
        k = self.causal
        if k.read_offset is None:
            return None
        layer = k.read_layer if k.read_layer is not None else max(self.capture.layers)
        return Cell(MEMENTO, k.read_offset, layer, self.probe.pooling)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    extra = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"] or msg.startswith("config field"):  # a check across fields names its fields itself
        return msg + extra
    where = ".".join(str(p) for p in err["loc"])
    if err["type"].endswith("_type"):  # a value of the wrong type: say which (strict: true is no integer)
        msg += f", got {type(err['input']).__name__} {repr(err['input'])[:40]}"
    return f"config field '{where}': {msg}{extra}"


def parse_config(data: Any, source: str = "config") -> ExperimentConfig:
    """Validate a mapping as an ExperimentConfig; ConfigError names the first bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_first_error(e)}") from None


class _ConfigLoader(UniqueKeyLoader):
    """The safe loader of config files: a key given twice is refused (`UniqueKeyLoader`), and 1e-3 is
    the number YAML 1.2 and JSON make it (YAML 1.1 wants 1.0e-3)."""


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+.0123456789"))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a mapping, refusing a key given twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"duplicate key {key!r}")
        out[key] = value
    return out


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
    if path.suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"{path}: unknown config format {path.suffix!r} (use .yaml, .toml or .json)")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)  # refuses a key given twice itself
        elif path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_keys)
        else:
            data = yaml.load(text, Loader=_ConfigLoader) or {}  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: TOML's and JSON's errors, and a YAML date like 2024-13-01
        first = str(e).strip().splitlines()
        raise ConfigError(f"{path}: malformed {path.suffix[1:].upper()}: {' '.join(first[:2])}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return parse_config(apply_overrides(data, overrides), str(path))


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
