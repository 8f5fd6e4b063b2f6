"""One declaration per option: the config's probe, causal, capture and mask sections are generated from the
library's dataclasses, under their names; renamed keys are read for one release with a warning."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any

import pytest

from kvprobe.analysis import ProbeConfig
from kvprobe.capture.spec import CaptureConfig
from kvprobe.causal import CausalConfig
from kvprobe.config import (FILLED_ELSEWHERE, RENAMED_KEYS, ConfigError, ExperimentConfig, load_config,
                            parse_config)
from kvprobe.config.sections import probe_section, section_from, spec_from
from kvprobe.grid import FAMILIES, LINEAR, MEMENTO, MLP, TENSORS, Cell
from kvprobe.memento.masks import MaskConfig
from kvprobe.probes import LinearConfig, MLPConfig
from tests.helpers.paths import DOCS, EXPERIMENTS

CONFIGS = sorted(EXPERIMENTS.glob("*.yaml")) + sorted(EXPERIMENTS.glob("*.toml"))


def _quiet(data: dict[str, Any]) -> ExperimentConfig:
    """parse_config, refusing any DeprecationWarning: the config uses the current names only."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return parse_config(data)


def _properties(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """The properties of a section in a JSON schema, following $ref (and a nullable section's anyOf)."""
    for option in node.get("anyOf", [node]):
        if "$ref" in option:
            return schema["$defs"][option["$ref"].rsplit("/", 1)[1]]["properties"]
        if "properties" in option:
            return option["properties"]
    raise AssertionError(f"no section in {node}")


# ----------------------------------------------------------------------------- generated from the dataclasses


def test_a_field_added_to_probe_settings_is_a_config_key():
    """The probe section is generated: a new ProbeConfig field (plain or a nested dataclass) is a key of its
    schema with its default, and reaches the settings, with no edit to the config code."""

    @dataclass(frozen=True)
    class WiderSettings(ProbeConfig):
        new_knob: int = 7
        new_solver: LinearConfig = LinearConfig(l2=0.5)

    section = probe_section(WiderSettings, "WiderProbeSection")
    schema = section.model_json_schema()
    assert schema["properties"]["new_knob"]["default"] == 7
    assert _properties(schema, schema["properties"]["new_solver"])["l2"]["default"] == 0.5
    assert "new_knob" not in ExperimentConfig.model_json_schema()["$defs"]["ProbeSection"]["properties"]
    settings = spec_from(WiderSettings, section(new_knob=9, new_solver={"tol": 0.01}), split_seed=0, device=None)
    assert settings.new_knob == 9 and settings.new_solver == LinearConfig(l2=0.5, tol=0.01)


def test_any_dataclass_becomes_a_section_and_back():
    @dataclass(frozen=True)
    class Knobs:
        count: int = 3
        names: tuple[str, ...] = ("a",)
        solver: MLPConfig = MLPConfig(hidden=(8,))

    section = section_from(Knobs, "KnobsSection")
    props = section.model_json_schema()["properties"]
    assert set(props) == {"count", "names", "solver"} and props["count"]["default"] == 3
    assert spec_from(Knobs, section()) == Knobs()
    assert spec_from(Knobs, section(count=5, solver={"lr": 0.1})) == Knobs(5, solver=MLPConfig(hidden=(8,), lr=0.1))
    with pytest.raises(ValueError, match="count"):
        section(count="many")


# each library dataclass and where its section sits in ExperimentConfig's schema
SECTIONS = [(CaptureConfig, ("capture",)), (ProbeConfig, ("probe",)), (LinearConfig, ("probe", "linear")),
            (MLPConfig, ("probe", "mlp")), (CausalConfig, ("causal",)), (MaskConfig, ("causal", "ablate_with"))]


@pytest.mark.parametrize("spec, where", SECTIONS, ids=lambda x: ".".join(x) if isinstance(x, tuple) else x.__name__)
def test_every_library_field_is_a_config_key_under_its_own_name(spec, where):
    """Every field of ProbeConfig, CausalConfig, CaptureConfig, MaskConfig, LinearConfig and MLPConfig is a key of
    its config section, named as the library names it, except those FILLED_ELSEWHERE lists with their source."""
    schema = ExperimentConfig.model_json_schema()
    props = schema["properties"]
    for name in where:
        props = _properties(schema, props[name])
    filled = FILLED_ELSEWHERE.get(spec, {})
    assert all(reason.strip() for reason in filled.values())
    assert set(filled) <= {f.name for f in fields(spec)}, "FILLED_ELSEWHERE names a field the library has not"
    missing = [f.name for f in fields(spec) if f.name not in filled and f.name not in props]
    assert missing == []
    assert not set(filled) & set(props), "a field filled from elsewhere is also a key"


def test_the_conditions_are_mask_sections():
    schema = ExperimentConfig.model_json_schema()
    props = _properties(schema, schema["properties"]["conditions"]["additionalProperties"])
    assert set(props) == {f.name for f in fields(MaskConfig)} - set(FILLED_ELSEWHERE[MaskConfig])


def test_an_empty_config_hands_out_the_python_defaults():
    cfg = _quiet({"causal": {"layers": [0, 3]}})
    assert cfg.capture_spec(MEMENTO) == CaptureConfig(layers=(0, 1, 2, 3))
    for family in FAMILIES:
        assert cfg.probe_settings(family) == ProbeConfig(families=(family,), device="cpu")
    assert cfg.causal_spec() == CausalConfig(layers=(0, 3))
    assert cfg.causal_read_cell() == Cell(MEMENTO, 1, 3) and cfg.causal_condition() == MEMENTO
    assert _quiet({}).causal_spec() is None


def test_nested_sections_are_checked_and_named():
    cfg = _quiet({"probe": {"linear": {"max_iter": 50, "precondition": False}, "mlp": {"hidden": [64], "lr": 0.01}}})
    s = cfg.probe_settings(MLP)
    assert s.linear == replace(ProbeConfig().linear, max_iter=50, precondition=False)
    assert s.mlp == MLPConfig(hidden=(64,), lr=0.01)
    for bad, field in (({"linear": {"tol": 0}}, "probe.linear.tol"), ({"mlp": {"hidden": []}}, "probe.mlp.hidden"),
                       ({"linear": {"nope": 1}}, "probe.linear.nope"), ({"sites": ["block_end"]}, "probe.sites")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            parse_config({"probe": bad})


def test_model_device_is_checked_before_anything_loads():
    for device in ("cpu", "cuda", "cuda:1", "mps"):
        assert _quiet({"model": {"device": device}}).model.device == device
    for bad in ("final", "gpu", "cuda:", "cuda:x", ""):
        with pytest.raises(ConfigError, match=r"'model\.device': not a device"):
            parse_config({"model": {"device": bad}})


def test_probe_settings_per_family_and_condition():
    cfg = _quiet({"capture": {"sites": ["memento", "block_end"]}, "conditions": {"a": {}, "b": {"restart_mode": True}},
                  "probe": {"layers": [1, 2], "mlp_layers": [2], "mlp_sites": ["block_end"],
                            "shuffled_control": ["b"]}})
    linear, mlp = cfg.probe_settings(LINEAR, "a"), cfg.probe_settings(MLP, "b")
    assert (linear.layers, linear.sites, linear.shuffled_control) == ((1, 2), None, False)
    assert (mlp.layers, mlp.sites, mlp.shuffled_control, mlp.families) == ((2,), ("block_end",), True, (MLP,))


# ----------------------------------------------------------------------------- renamed keys

# a value for every renamed key (RENAMED_KEYS: section -> old -> new)
OLD_VALUES = {("capture", "kinds"): ["k"], ("probe", "kinds"): [LINEAR], ("probe", "linear_l2"): 0.01,
              ("probe", "linear_tol"): 1e-4, ("probe", "mlp_max_epochs"): 7, ("probe", "extend_l2_grid"): False}
RENAMES = [(section, old, new) for section, renames in RENAMED_KEYS.items() for old, new in renames.items()]


def _nested(section: str, dotted: str, value: Any) -> dict[str, Any]:
    *parents, leaf = dotted.split(".")
    node: dict[str, Any] = {leaf: value}
    for part in reversed(parents):
        node = {part: node}
    return {section: node}


def test_every_renamed_key_has_a_test_value():
    assert set(OLD_VALUES) == {(s, old) for s, old, _ in RENAMES}


@pytest.mark.parametrize("section, old, new", RENAMES, ids=[f"{s}.{o}" for s, o, _ in RENAMES])
def test_an_old_key_loads_with_one_warning_and_means_the_new_key(section, old, new):
    value = OLD_VALUES[(section, old)]
    with pytest.warns(DeprecationWarning) as caught:
        before = parse_config({section: {old: value}})
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert messages == [f"config key '{section}.{old}' is deprecated; use '{section}.{new}'"]
    after = _quiet(_nested(section, new, value))
    assert before == after and before.to_dict() == after.to_dict()
    for family in FAMILIES:
        assert before.probe_settings(family, MEMENTO) == after.probe_settings(family, MEMENTO)
    assert before.capture_spec(MEMENTO) == after.capture_spec(MEMENTO)


@pytest.mark.parametrize("section, old, new", RENAMES, ids=[f"{s}.{o}" for s, o, _ in RENAMES])
def test_an_old_key_with_its_new_key_is_refused_naming_both(section, old, new):
    value = OLD_VALUES[(section, old)]
    data = _nested(section, new, value)
    data[section][old] = value
    with pytest.raises(ConfigError, match=rf"'{section}\.{old}' and '{section}\.{new}' both given"):
        parse_config(data)


def test_an_old_key_set_from_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("probe: {linear: {tol: 0.01}}\n")
    with pytest.warns(DeprecationWarning, match="probe.linear_l2"):
        cfg = load_config(path, {"probe.linear_l2": 0.1})
    assert cfg.probe.linear.l2 == 0.1 and cfg.probe.linear.tol == 0.01 and cfg.probe.linear_l2_grid == (0.1,)


def _as_before_the_rename(resolved: dict[str, Any]) -> dict[str, Any]:
    """A resolved config as a run's config.json recorded it before the rename (old keys, no new ones)."""
    probe, capture = dict(resolved["probe"]), dict(resolved["capture"])
    linear, mlp = probe.pop(LINEAR), probe.pop(MLP)
    for new_only in ("sites", "max_group_bytes"):
        assert probe.pop(new_only) == getattr(ProbeConfig(), new_only)
    probe.update(kinds=probe.pop("families"), linear_l2=linear["l2"], linear_tol=linear["tol"],
                 mlp_max_epochs=mlp["max_epochs"], extend_l2_grid=probe.pop("extend_grid"))
    capture["kinds"] = capture.pop("tensors")
    return {**resolved, "probe": probe, "capture": capture}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_run_recorded_before_the_rename_reads_back_the_same(path):
    """`kvprobe probe/report RUN` on a run made before the rename: its recorded config loads to the same one."""
    cfg = load_config(path)
    with pytest.warns(DeprecationWarning):
        old = parse_config(_as_before_the_rename(cfg.to_dict()))
    assert old == cfg
    assert parse_config(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------- behaviour unchanged


def _settings_before(cfg: ExperimentConfig, kind: str, condition: str | None = None) -> ProbeConfig:
    """experiment/pipeline.py's `_settings` before ExperimentConfig handed the settings out, its logic
    unchanged, reading the renamed fields (probe.linear_l2 -> probe.linear.l2, ...)."""
    p = cfg.probe
    layers, offsets, sites = p.layers, p.offsets, None
    if kind == MLP:
        layers, offsets, sites = p.mlp_layers or layers, p.mlp_offsets or offsets, p.mlp_sites
    shuffled = p.shuffled_control if isinstance(p.shuffled_control, bool) else condition in p.shuffled_control
    return ProbeConfig(families=(kind,), seeds=p.seeds, val_fraction=p.val_fraction, split_seed=cfg.seed,
                         pooling=p.pooling, shuffled_control=shuffled, n_boot=p.n_boot,
                         layers=layers, offsets=offsets, sites=sites, device=cfg.model.device,
                         linear=LinearConfig(l2=p.linear.l2, tol=p.linear.tol),
                         mlp=MLPConfig(max_epochs=p.mlp.max_epochs), linear_l2_grid=p.linear_l2_grid,
                         mlp_l2_grid=p.mlp_l2_grid, inner_fraction=p.inner_fraction, extend_grid=p.extend_grid)


def _causal_before(cfg: ExperimentConfig) -> CausalConfig | None:
    k = cfg.causal
    if k.layers is None:
        return None
    condition = k.condition or next(iter(cfg.conditions))
    return CausalConfig(layers=k.layers, offsets=k.offsets, sites=k.sites, pooling=cfg.probe.pooling,
                      mask=MaskConfig(**cfg.conditions[condition].model_dump()),
                      ablate_with=MaskConfig(**k.ablate_with.model_dump()), n_samples=k.n_samples,
                      batch_size=k.batch_size, backend=cfg.capture.backend, n_boot=cfg.probe.n_boot)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_shipped_configs_give_the_settings_they_gave_before(path):
    """Every shipped study gets the same ProbeConfig, CaptureConfig and CausalConfig as before the change (the
    values were also compared as reprs against the old code on every config, 50 values, all equal)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the shipped configs use the current names
        cfg = load_config(path)
    for family in FAMILIES:
        for condition in (None, *cfg.conditions):
            assert cfg.probe_settings(family, condition) == _settings_before(cfg, family, condition)
    for condition, mask in cfg.conditions.items():
        c = cfg.capture
        assert cfg.capture_spec(condition) == CaptureConfig(
            layers=c.layers, offsets=c.offsets, sites=c.sites, tensors=c.tensors, pooling=c.pooling,
            max_tokens=c.max_tokens, dtype=c.dtype, batch_size=c.batch_size, shard_size=c.shard_size,
            backend=c.backend, compression=c.compression, mask=MaskConfig(**mask.model_dump()))
    assert cfg.causal_spec() == _causal_before(cfg)


# ----------------------------------------------------------------------------- the library's renamed fields

# the keys a store's config.json records under "capture", in order, as stores were written before the rename
STORED_CAPTURE_KEYS = ["layers", "offsets", "target_block", "sites", "kinds", "pooling", "max_tokens", "dtype",
                       "mask", "batch_size", "shard_size", "backend", "compression"]


def test_a_store_records_the_capture_spec_as_before():
    """New stores are written as old ones were (the tensors under "kinds"), so stores made before the
    rename open, are checked against a run's spec and resume, and a new store is byte for byte an old one's."""
    spec = CaptureConfig(layers=(0, 2), tensors=("v",))
    assert list(spec.to_dict()) == STORED_CAPTURE_KEYS and spec.to_dict()["kinds"] == ["v"]


def test_a_store_config_with_kinds_reads_back(tmp_path):
    record = {"layers": [0, 1], "offsets": [-1, 0, 1], "target_block": 1, "sites": [MEMENTO], "kinds": ["k"],
              "pooling": ["tail_mean"], "max_tokens": 4, "dtype": "float16",
              "mask": {"keep_last_n_blocks": 0, "mask_delimiters": False, "restart_mode": False},
              "batch_size": 64, "shard_size": 1024, "backend": "transformers", "compression": "none"}
    (tmp_path / "config.json").write_text(json.dumps({"capture": record}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # a store's own record is not deprecated
        spec = CaptureConfig.from_dict(json.loads((tmp_path / "config.json").read_text())["capture"])
    assert spec.tensors == ("k",) and spec.layers == (0, 1) and spec.target_block == 1
    assert CaptureConfig.from_dict(spec.to_dict()) == spec
    named = dict(record)
    named["tensors"] = named.pop("kinds")
    assert CaptureConfig.from_dict(named) == spec  # the field's own name
    with pytest.raises(ValueError, match="both 'tensors' and 'kinds'"):
        CaptureConfig.from_dict({**spec.to_dict(), "tensors": ["k"]})


@pytest.mark.parametrize("cls, old, new, value", [(CaptureConfig, "kinds", "tensors", ("k",)),
                                                  (ProbeConfig, "kinds", "families", (LINEAR,))])
def test_the_old_field_names_work_for_one_release(cls, old, new, value):
    args = {"layers": (0,)} if cls is CaptureConfig else {}
    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}\({old}=\.\.\.\) is deprecated; use {new}="):
        made = cls(**args, **{old: value})
    assert made == cls(**args, **{new: value})
    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}\.{old} is deprecated"):
        assert getattr(made, old) == value
    assert replace(made, **{new: getattr(cls(**args), new)}) == cls(**args)
    with pytest.raises(TypeError, match=f"give {new}= only"):
        cls(**args, **{old: value, new: value})


def test_the_tensors_are_checked_under_their_name():
    with pytest.raises(ValueError, match="capture spec field 'tensors'"):
        CaptureConfig(layers=(0,), tensors=("q",))
    assert CaptureConfig(layers=(0,)).tensors == TENSORS


def test_the_config_reference_lists_the_nested_keys_and_the_renames():
    text = (DOCS / "cli.md").read_text()
    schema = ExperimentConfig.model_json_schema()
    probe = _properties(schema, schema["properties"]["probe"])
    for nested in (LINEAR, MLP):
        for key in _properties(schema, probe[nested]):
            assert f"`probe.{nested}.{key}`" in text, f"probe.{nested}.{key}"
    for section, old, new in RENAMES:
        assert f"| `{section}.{old}` | `{section}.{new}` |" in text, f"{section}.{old}"
