"""The config sections generated from the library's dataclasses, and the machinery that generates them.

`section_from(spec, ...)` makes a pydantic section of a dataclass: its fields under their names with
their defaults, a nested dataclass as a nested section; `spec_from(spec, section, ...)` turns a
section back into the dataclass. So `CaptureConfig`, `MaskConfig`, `ProbeConfig` (with `LinearConfig`
and `MLPConfig`) and `CausalConfig` are declared once, in the library, and a config key is the field's
name. What only a config says is declared here, once (`extra=`); the fields the config fills from
another section are listed with their source in FILLED_ELSEWHERE; keys renamed to the library's
names are read for one release (RENAMED_KEYS, with a DeprecationWarning).
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from collections.abc import Collection
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from ..capture.spec import BACKENDS, COMPRESSIONS, STORAGE_DTYPES, CaptureConfig
from ..causal.config import CausalConfig
from ..grid import CONTENT_TOKENS, FAMILIES, LINEAR, POOLINGS, SITES, TENSORS
from ..memento.config import MaskConfig
from ..probes.config import TARGETS, DecoderConfig, LinearConfig, MLPConfig, ProbeConfig, ReconstructionConfig

__all__ = ["FILLED_ELSEWHERE", "RENAMED_KEYS", "CaptureSection", "CausalSection", "MaskSection", "ProbeSection",
           "ReconstructSection", "causal_section", "probe_section", "reconstruct_section", "renamed_keys",
           "section_from", "spec_from"]


class _Strict(BaseModel):
    """A config section: unknown keys refused, and types strict: a bool is no int (`seed: true`), a float
    or a string no int (`n_samples: 300.0`, `"300"`), a number no bool. A list is read as the tuple
    the fields declare (YAML, TOML and JSON have lists only)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _lists_as_tuples(cls, value: Any) -> Any:
        return _as_tuples(value)


def _as_tuples(value: Any) -> Any:
    """Lists as tuples, nested lists too."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


_Spec = TypeVar("_Spec")


def _fields_of(instance: Any) -> dict[str, Any]:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


def section_from(spec: type, name: str, types: dict[str, Any] | None = None, *, exclude: Collection[str] = (),
                 defaults: dict[str, Any] | None = None, extra: dict[str, tuple[Any, Any]] | None = None,
                 sections: dict[type, Any] | None = None, base: type[BaseModel] = _Strict,
                 doc: str | None = None) -> type[BaseModel]:
    """A config section declared once: the fields and defaults of the dataclass `spec`, under its names.

    `types` narrows what pydantic checks per field, so a bad value names its config field (the
    allowed values are the spec's own tuples); a field it leaves out is checked as the spec annotates
    it, so a field added to the spec is a config key with no edit here. A field holding a dataclass
    is a nested section: `sections[its class]` when that is a section (MaskSection: its own defaults),
    else one made the same way with `sections[its class]` as its `types` and the field's default as its
    defaults. `exclude` drops fields another part of the config fills (FILLED_ELSEWHERE); `defaults`
    sets a default the spec does not have; `extra` adds config-only keys, name -> (type, default);
    `base` carries the section's validators.
    """
    hints = typing.get_type_hints(spec)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, f.default if f.default_factory is dataclasses.MISSING
                                       else f.default_factory())
        if default is dataclasses.MISSING:
            raise TypeError(f"{spec.__name__}.{f.name} has no default: give one in `defaults`")
        kind = (types or {}).get(f.name, hints[f.name])
        if f.name not in (types or {}) and dataclasses.is_dataclass(hints[f.name]):
            given = (sections or {}).get(hints[f.name])
            kind = given if isinstance(given, type) else section_from(
                hints[f.name], name.removesuffix("Section") + f.name.title().replace("_", "") + "Section", given,
                defaults=_fields_of(default), sections=sections)
            default = kind.model_validate({k: v for k, v in _fields_of(default).items() if k in kind.model_fields})
        fields[f.name] = (kind, default)
    return create_model(name, __base__=base, __module__=__name__, __doc__=doc or spec.__doc__,
                        **fields, **(extra or {}))


def spec_from(spec: type[_Spec], section: BaseModel, **filled: Any) -> _Spec:
    """The dataclass `spec` from its config section (nested sections too), plus the fields `filled` from elsewhere."""
    hints = typing.get_type_hints(spec)
    values = {}
    for f in dataclasses.fields(spec):  # type: ignore[arg-type]
        if f.name in filled:
            values[f.name] = filled[f.name]
        elif f.name in type(section).model_fields:
            v = getattr(section, f.name)
            values[f.name] = spec_from(hints[f.name], v) if isinstance(v, BaseModel) else v
    return spec(**values)


# the library's fields no config key sets, each with where its value comes from (`exclude` above)
FILLED_ELSEWHERE: dict[type, dict[str, str]] = {
    CaptureConfig: {"target_block": "data.target_block (the sample source holds it)", "mask": "conditions"},
    MaskConfig: {"prefill_causal": "for the generator and direct calls: capture gives no prompt lengths yet"},
    ProbeConfig: {"split_seed": "seed", "device": "model.device (the probes run where the model does)"},
    CausalConfig: {"pooling": "probe.pooling", "mask": "causal.condition's entry in conditions",
                 "backend": "capture.backend", "n_boot": "probe.n_boot"},
    ReconstructionConfig: {"probe": "probe.* (split, pooling, linear and mlp settings), with reconstruct.families, "
                                    "layers and offsets"},
}

# keys renamed to the library's names, read for one release with a DeprecationWarning: section ->
# old key -> its new place (dotted: inside a nested section)
RENAMED_KEYS: dict[str, dict[str, str]] = {
    "capture": {"kinds": "tensors"},
    "probe": {"kinds": "families", "linear_l2": "linear.l2", "linear_tol": "linear.tol",
              "mlp_max_epochs": "mlp.max_epochs", "extend_l2_grid": "extend_grid"},
}


def renamed_keys(data: dict[str, Any]) -> dict[str, Any]:
    """The config mapping `data` with RENAMED_KEYS' old keys moved to their new places, each with a
    DeprecationWarning naming both (a copy: `data` is left as it is). A section that gives an old key
    and its new one is refused, naming both."""
    for section, renames in RENAMED_KEYS.items():
        given = data.get(section)
        if not isinstance(given, dict) or not set(renames) & set(given):
            continue
        moved = dict(given)
        for old, new in renames.items():
            *parents, leaf = new.split(".")
            node: Any = moved
            for part in parents if old in moved else ():  # into the nested section (a copy), unless it is no mapping
                inner = node.get(part) or {}
                if not isinstance(inner, dict):
                    node = None
                    break
                node[part] = node = dict(inner)
            if old not in moved or node is None:
                continue  # not given, or the nested section is no mapping: validation names what is wrong
            if leaf in node:
                raise ValueError(f"config fields '{section}.{old}' and '{section}.{new}' both given: '{section}.{old}' "
                                 f"is the deprecated name of '{section}.{new}'; give only '{section}.{new}'")
            warnings.warn(f"config key '{section}.{old}' is deprecated; use '{section}.{new}'", DeprecationWarning,
                          stacklevel=2)
            node[leaf] = moved.pop(old)
        data = {**data, section: moved}
    return data


_Positive = Annotated[int, Field(ge=1)]
_NonEmpty = Field(min_length=1)  # a list field that must name at least one thing
_Fraction = Annotated[float, Field(gt=0, lt=1)]
_Strengths = Annotated[tuple[Annotated[float, Field(gt=0)], ...], _NonEmpty]
_Layers = Annotated[tuple[int, ...], _NonEmpty]
_Sites = Annotated[tuple[Literal[SITES], ...], _NonEmpty]  # type: ignore[valid-type]
CaptureSection = section_from(
    CaptureConfig, "CaptureSection",
    {"layers": _Layers, "offsets": _Layers, "sites": _Sites,
     "tensors": Annotated[tuple[Literal[TENSORS], ...], _NonEmpty],  # type: ignore[valid-type]
     "pooling": Annotated[tuple[Literal[POOLINGS], ...], _NonEmpty],  # type: ignore[valid-type]
     "max_tokens": _Positive, "dtype": Literal[STORAGE_DTYPES], "batch_size": _Positive,  # type: ignore[valid-type]
     "shard_size": _Positive, "backend": Literal[BACKENDS], "compression": Literal[COMPRESSIONS]},  # type: ignore[valid-type]
    exclude=FILLED_ELSEWHERE[CaptureConfig],
    defaults={"layers": (0, 1, 2, 3)},  # every layer of the toy (the spec's layers depend on the model)
)
MaskSection = section_from(
    MaskConfig, "MaskSection",
    {"keep_last_n_blocks": Annotated[int, Field(ge=-1)], "mask_delimiters": bool | None, "restart_mode": bool,
     "evict_before_summary_end": bool, "restart_sees_kept_blocks": bool, "keep_last_block_for_answer": bool},
    exclude=FILLED_ELSEWHERE[MaskConfig])


# what pydantic checks in the probe families' own sections (probe.linear, probe.mlp); their defaults are
# ProbeConfig' (the linear probe's tol 1e-3, LinearConfig's own 1e-4: it moves accuracy < 1 pp)
LINEAR_TYPES = {"l2": Annotated[float, Field(gt=0)], "tol": Annotated[float, Field(gt=0)], "max_iter": _Positive,
                "history": _Positive, "max_halvings": _Positive, "gram_rows": _Positive}
MLP_TYPES = {"hidden": Annotated[tuple[_Positive, ...], _NonEmpty], "l2": Annotated[float, Field(ge=0)],
             "lr": Annotated[float, Field(gt=0)], "batch_size": _Positive, "max_epochs": _Positive,
             "patience": _Positive, "holdout_fraction": Annotated[float, Field(ge=0, lt=1)], "eval_batch": _Positive}


class _ProbeChecks(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _fixed_l2_is_a_one_value_grid(cls, data: Any) -> Any:
        """linear.l2 alone fixes the strength (the grid [l2]); with linear_l2_grid present (a resolved
        config) the grid rules."""
        linear = data.get(LINEAR) if isinstance(data, dict) else None  # ProbeConfig.linear: the family's config
        if isinstance(linear, dict) and "l2" in linear and "linear_l2_grid" not in data:
            data = {**data, "linear_l2_grid": [linear["l2"]]}
        return data


def probe_section(spec: type = ProbeConfig, name: str = "ProbeSection") -> type[BaseModel]:
    """The probe section generated from `spec` (ProbeConfig), plus what only a config says:
    per-condition shuffled controls and the MLP's own cell subset."""
    return section_from(
        spec, name,
        {"families": Annotated[tuple[Literal[FAMILIES], ...], _NonEmpty],  # type: ignore[valid-type]
         "seeds": _Positive,  # MLP initialisations; the convex linear probe is fitted once
         "val_fraction": _Fraction, "n_boot": Annotated[int, Field(ge=100)], "max_group_bytes": _Positive,
         "pooling": Literal[POOLINGS] | None,  # type: ignore[valid-type]  # None: capture.pooling's first
         "shuffled_control": bool | tuple[str, ...],  # True: every condition; or the conditions
         "layers": _Layers | None, "offsets": _Layers | None, "sites": _Sites | None,  # cells; None: all captured
         # strength chosen per cell on an inner label-unique split of the training passcodes (inner_fraction
         # of them); a one-value grid is a fixed strength. linear.l2 without linear_l2_grid means [linear.l2].
         "linear_l2_grid": _Strengths, "mlp_l2_grid": _Strengths | None, "inner_fraction": _Fraction,
         "extend_grid": bool,  # try a decade past a grid's edge (kvprobe.probes.L2_BOUNDS); false keeps the grid
         "extend_ties": bool},  # an edge tied with the best is extended too; false: only an edge that is chosen
        exclude=FILLED_ELSEWHERE[ProbeConfig], defaults={"pooling": None},
        extra={"mlp_layers": (_Layers | None, None),  # the MLP's cells, a subset to save time; None: as above
               "mlp_offsets": (_Layers | None, None),
               "mlp_sites": (tuple[Literal[SITES], ...] | None, None)},  # type: ignore[valid-type]
        sections={LinearConfig: LINEAR_TYPES, MLPConfig: MLP_TYPES}, base=_ProbeChecks)


ProbeSection = probe_section()


def causal_section(spec: type = CausalConfig, name: str = "CausalSection") -> type[BaseModel]:
    """Does the model use what leaks? KV interchange and channel ablation on the probe's cells
    (kvprobe.causal), generated from `spec` (CausalConfig); the stage runs when `layers` is given."""
    return section_from(
        spec, name,
        {"layers": _Layers | None, "offsets": _Layers, "sites": _Sites,  # layers None: no causal stage
         "n_samples": Annotated[int, Field(ge=2)],  # samples after the probes' (data.n_samples on): never probed
         "batch_size": Annotated[int, Field(ge=2)]},
        exclude=FILLED_ELSEWHERE[CausalConfig], defaults={"layers": None}, sections={MaskConfig: MaskSection},
        extra={"condition": (str | None, None),  # the mask the model runs under, the reader's store; None: the first
               "read_offset": (int | None, 1),  # the interchange's probe reads this offset (None: no read-out)
               "read_layer": (int | None, None)},  # ... at this layer (None: the last captured layer)
        doc=causal_section.__doc__)


CausalSection = causal_section()


_HalfContent = Annotated[int, Field(ge=1, le=CONTENT_TOKENS // 2)]  # a longer block is stored as its two halves
DECODER_TYPES = {"width": _Positive, "heads": _Positive, "lr": Annotated[float, Field(gt=0)],
                 "weight_decay": Annotated[float, Field(ge=0)], "batch_size": _Positive, "max_epochs": _Positive,
                 "patience": _Positive}


def reconstruct_section(spec: type = ReconstructionConfig, name: str = "ReconstructSection") -> type[BaseModel]:
    """What survives an erased block (kvprobe.reconstruction), generated from `spec` (ReconstructionConfig):
    the target, the vocabulary cut and the baseline's smoothing; the probes are the probe section's, on
    `families` (one seed) at `layers` and `offsets` (None: the probe section's). `kvprobe run` runs the
    stage when `layers` is given; `kvprobe reconstruct RUN` runs it on any run."""
    return section_from(
        spec, name,
        {"target": Literal[TARGETS], "positions": _HalfContent, "k": _HalfContent, "vocab": _Positive,  # type: ignore[valid-type]
         "smoothing": Annotated[float, Field(gt=0)], "l2_grid": _Strengths},
        exclude=FILLED_ELSEWHERE[ReconstructionConfig], sections={DecoderConfig: DECODER_TYPES},
        extra={"families": (Annotated[tuple[Literal[FAMILIES], ...], _NonEmpty], (LINEAR,)),  # type: ignore[valid-type]
               "layers": (_Layers | None, None), "offsets": (_Layers | None, None)},
        doc=reconstruct_section.__doc__)


ReconstructSection = reconstruct_section()
