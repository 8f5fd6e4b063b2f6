"""Leakage analysis: probe every (site, offset, layer) cell of a store, with controls.

    grid = probe_store(KVStore("runs/toy/stores/memento"), "memento", ProbeConfig())
    rows = grid.rows                        # one CellResult per (site, offset, layer, probe)
    diffs = compare(grid, restart_grid)     # paired differences on the same validation passcodes
    curves = sensitivity_curves(store, "memento", settings, cells=[Cell("memento", 1, 3)])  # accuracy vs L2
    grid.cell(Cell("memento", 1, 3), "linear")  # one row; grid.per_sample[(cell, "linear")] its scores

The linear probe's L2 strength is chosen per cell on an inner label-unique split of the
training passcodes (`ProbeConfig.linear_l2_grid`), then refitted on the whole training
split; the validation split only scores. Each row carries the strength it used (`l2`).

The split is label-unique and a pure function of the passcodes and `split_seed`, so
every condition captured from the same samples is scored on the same validation
passcodes, and differences between conditions are paired.

Offsets: -1 causal control (must be at chance), 0 direct, +1, +2, ... masked.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.passcodes import PasscodeConfig, allowed_codes, label_unique_split
from .grid import LINEAR, MLP, Cell, offset_role, pooled_vectors
from .memento.masks import MaskConfig
from .probes import (fit_at_strengths, fit_mlp_replicas, fit_probes, normalise_grid, select_strength, shared_moments,
                     still_improving_at_limit, strength_path)
from .probes.config import ProbeConfig  # how to probe, torch-free (the config reads it); re-exported here
from .stats import (binomial_pvalue, bootstrap_ci, constrained_pvalue, digit_accuracy, holm, paired_bootstrap_ci,
                    paired_pvalue, per_sample_accuracy, per_sample_bits, shuffle_labels, wilson_interval)
from .files import replacing, together, write_text
from .store import KVStore
from .errors import renamed

__all__ = ["Cell", "CellResult", "DiffResult", "GridResult", "ProbeConfig", "SensitivityCurve", "apply_holm",
           "compare", "feature_groups", "load_grid", "merge_grids", "paired_differences", "planned_cells",
           "probe_store", "save_grid", "sensitivity_curves"]


@dataclass
class CellResult:
    """One probe on one (condition, site, offset, layer) cell. Accuracies are fractions."""

    condition: str
    site: str
    offset: int
    layer: int
    probe: str
    accuracy: float  # mean over seeds
    accuracy_std: float  # over seeds (0 for one fit)
    accuracy_seeds: list[float]
    digit_accuracy: list[float]
    ci_low: float  # 95% bootstrap over validation passcodes
    ci_high: float
    wilson_low: float
    wilson_high: float
    bits: float  # log2(10) - validation cross-entropy in bits, per digit
    bits_low: float
    bits_high: float
    p_value: float  # one-sided exact test vs chance (binomial; constrained passcodes: their exact null)
    shuffled_accuracy: float | None
    selectivity: float | None
    train_accuracy: float
    n_train: int
    n_val: int
    p_holm: float = float("nan")  # filled by apply_holm over the whole report
    significant: bool = False
    l2: float | None = None  # L2 strength of the reported probe: chosen on the inner split, or fixed
    l2_grid: list[float] | None = None  # the values it was chosen from (one value: fixed)
    l2_inner_accuracy: list[float] | None = None  # inner-validation accuracy at each l2_grid value
    l2_at_bound: bool = False  # the chosen l2 is on an edge of l2_grid that the extension could not pass
    epochs: int | None = None  # MLP: the epoch whose weights were kept (the latest over seeds)
    epochs_at_cap: bool = False  # MLP: a fit (or an inner fit choosing its l2) still improved within `patience`
    #                               epochs of its limit: more may read more
    chance: float = 0.1  # accuracy without features: 1/10, or the majority baseline of constrained passcodes
    mask: str | None = None  # the canonical name of the store's mask (MaskConfig.name): what the condition is
    pooling: str | None = None  # how the cell's tokens were pooled into features

    @property
    def l2_at_weak_bound(self) -> bool:
        """The chosen strength is the weakest its cell could try: a weaker one might read more leak."""
        return self.l2_at_bound and bool(self.l2_grid) and self.l2 == min(self.l2_grid)

    @property
    def cell(self) -> Cell:
        """The grid cell this row probed (rows saved before pooling was recorded: the default pooling)."""
        return Cell(self.site, self.offset, self.layer, self.pooling or Cell.pooling)

    @property
    def role(self) -> str:
        """The offset's role: 'causal control', 'direct' or 'masked'."""
        return offset_role(self.offset)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["role"] = self.role
        return d


@dataclass
class DiffResult:
    """Paired difference a - b of one cell between two conditions."""

    a: str
    b: str
    site: str
    offset: int
    layer: int
    probe: str
    difference: float
    ci_low: float
    ci_high: float
    a_mask: str | None = None  # MaskConfig.name of each condition: what the difference isolates
    b_mask: str | None = None
    pooling: str | None = None
    p_value: float = float("nan")  # two-sided paired t-test on the per-passcode differences (difference = 0)
    p_holm: float = float("nan")  # filled by apply_holm over every difference of the report
    significant: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GridResult:
    """All cells of one condition, plus per-sample scores for paired comparisons."""

    condition: str
    rows: list[CellResult]
    val_index: np.ndarray  # sample ids of the validation split, (M,)
    per_sample: dict[tuple[Cell, str], np.ndarray] = field(default_factory=dict)  # (cell, probe) -> (M,) accuracy

    def cell(self, cell: Cell, probe: str) -> CellResult:
        """The row of `probe` on `cell`."""
        for r in self.rows:
            if (r.cell, r.probe) == (cell, probe):
                return r
        raise KeyError((cell, probe))


def _groups(cells: list[Cell], n: int, d: int, budget: int) -> Iterable[list[Cell]]:
    per_cell = max(1, n * d * 4)
    size = max(1, budget // per_cell)
    for i in range(0, len(cells), size):
        yield cells[i : i + size]


def _plan(store: KVStore, settings: ProbeConfig) -> tuple[list[Cell], int]:
    """The cells `settings` asks for (at its pooling), and their feature width D."""
    layers = list(settings.layers) if settings.layers is not None else store.layers
    keys = [k for k in store.keys if k.pooling == settings.pooling]
    if settings.offsets is not None:
        keys = [k for k in keys if k.offset in settings.offsets]
    if settings.sites is not None:
        keys = [k for k in keys if k.site in settings.sites]
    if not keys:
        raise ValueError(f"store {store.path} has no features with pooling {settings.pooling!r} for the requested cells")
    cells = [Cell(k.site, k.offset, layer, k.pooling) for k in keys for layer in layers]
    D = int(store.config["dims"]["feature_dim"])
    D *= pooled_vectors(settings.pooling, int(store.config["capture"].get("max_tokens", 1)))  # vectors concatenated
    return cells, D


def _group_features(store: KVStore, group: list[Cell], D: int, tr: np.ndarray,
                    va: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and validation features of a group of cells, (G, N_tr, D) and (G, N_va, D), float32:
    read and converted once for every fit on them ('tokens', 'tail_mean': per-vector features flattened)."""
    X = np.stack([store.features(c.layer, c.offset, c.site, c.pooling) for c in group])
    X = X.reshape(len(group), -1, D)  # (G, N, D)
    return torch.from_numpy(X[:, tr]).float(), torch.from_numpy(X[:, va]).float()


def planned_cells(store: KVStore, settings: ProbeConfig) -> list[Cell]:
    """The cells of `store` that `settings` asks for (its pooling, offsets, sites and layers)."""
    return _plan(store, settings)[0]


def feature_groups(store: KVStore, settings: ProbeConfig, tr: np.ndarray, va: np.ndarray,
                   cells: list[Cell] | None = None) -> Iterator[tuple[list[Cell], torch.Tensor, torch.Tensor]]:
    """The cells `settings` asks for (or `cells`, a subset), in groups that fit `settings.max_group_bytes`,
    each with its features on training rows `tr` and validation rows `va`: (G, N_tr, D), (G, N_va, D)."""
    planned, D = _plan(store, settings)
    for group in _groups(planned if cells is None else cells, len(tr) + len(va), D, settings.max_group_bytes):
        yield (group, *_group_features(store, group, D, tr, va))


def _splits(store: KVStore, settings: ProbeConfig,
            need_inner: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Outer train / validation indices, and the inner validation mask over the training samples
    (label-unique within the training passcodes) when a strength is to be chosen."""
    passcodes = store.passcodes
    is_val = label_unique_split(passcodes, settings.val_fraction, settings.split_seed)
    tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    inner = None
    if need_inner:
        inner = label_unique_split([passcodes[i] for i in tr], settings.inner_fraction, settings.split_seed)
    return tr, va, inner


def _fits_per_cell(settings: ProbeConfig, kind: str) -> int:
    """Progress-bar fits per cell for one probe kind: each strength tried, each seed, the shuffled-label control."""
    grid = len(settings.strength_grid(kind))
    return (grid if grid > 1 else 0) + (settings.seeds if kind == MLP else 1) + int(settings.shuffled_control)


def _step(bar: Any, kind: str, n: int, what: str, extra: int | None = None) -> None:
    """One step of `n` fits, or `extra` fits beyond the plan (a grid extended past its edge)."""
    bar.total += extra or 0
    bar.set_postfix_str(f"{kind} {what}", refresh=False)
    bar.update(extra or n)


def _fit(X_tr: torch.Tensor, X_va: torch.Tensor, y_va: np.ndarray, kind: str, config: Any, device: str | None,
         moments: Any, sel: Any, y: np.ndarray, seed: int, warm: bool = False) -> Any:
    """One fit of a group on labels `y` at the selected strengths, scored on the validation split."""
    if sel.fixed:  # exactly the fixed-strength fit
        return fit_probes(X_tr, y, X_va, y_va, kind, l2=float(sel.grid[0]), seed=seed,
                          device=device, config=config, moments=moments)
    return fit_at_strengths(X_tr, y, X_va, y_va, sel.chosen, kind=kind, seed=seed, config=config,
                            device=device, init=sel.warm_start if warm else None, moments=moments)


def _fit_replicas(X_tr: torch.Tensor, y_tr: np.ndarray, X_va: torch.Tensor, y_va: np.ndarray, seeds: range, sel: Any,
                  config: Any, settings: ProbeConfig, bar: Any, done: Callable) -> tuple[list, np.ndarray | None]:
    """Every MLP seed and the shuffled-label control in one batched run: (fits, shuffled accuracy (G,) or None)."""
    label_sets = [y_tr] * len(seeds) + [shuffle_labels(y_tr, seed=1000)] * settings.shuffled_control
    run = fit_mlp_replicas(X_tr, label_sets, X_va, y_va, [*seeds, 0][:len(label_sets)],
                           l2=float(sel.grid[0]), config=config, device=settings.device,
                           on_epoch=lambda e, m: bar.set_postfix_str(f"mlp epoch {e}/{m}"))
    for what in [f"seed {s}" for s in seeds] + ["shuffled labels"] * settings.shuffled_control:
        done(what)
    return run[:len(seeds)], run[-1].accuracy if settings.shuffled_control else None


def _fit_in_turn(fit: Callable, y_tr: np.ndarray, seeds: range, kind: str, shuffled_control: bool,
                 done: Callable) -> tuple[list, np.ndarray | None]:
    """Each seed's fit, then the shuffled-label control's, one after another: (fits, shuffled accuracy (G,) or None)."""
    fits, shuffled = [], None
    for seed in seeds:
        fits.append(fit(y_tr, seed, warm=True))
        done(f"seed {seed}" if kind == MLP else "fit")
    if shuffled_control:
        shuffled = fit(shuffle_labels(y_tr, seed=1000), 0).accuracy
        done("shuffled labels")
    return fits, shuffled


def _fit_kind(X_tr: torch.Tensor, y_tr: np.ndarray, X_va: torch.Tensor, y_va: np.ndarray, inner: np.ndarray | None,
              kind: str, settings: ProbeConfig, bar: Any) -> tuple[Any, list, np.ndarray | None]:
    """Choose one kind's strength per cell of a group, then fit it: (selection, fits per seed, shuffled accuracy)."""
    done = partial(_step, bar, kind, len(X_tr))
    seeds = range(settings.seeds) if kind == MLP else range(1)
    config = settings.mlp if kind == MLP else settings.linear
    moments = shared_moments(X_tr, kind, config)  # one preconditioner for every linear fit below
    sel = select_strength(X_tr, y_tr, settings.strength_grid(kind), kind=kind, inner_val=inner, seed=0,
                          config=config, device=settings.device, moments=moments, extend=settings.extend_grid,
                          extend_ties=settings.extend_ties,
                          on_fit=lambda v, extra=None: done(f"choosing {v}", extra))  # training split only
    if kind == MLP and sel.fixed:  # every seed and the shuffled-label control in one batched run
        return sel, *_fit_replicas(X_tr, y_tr, X_va, y_va, seeds, sel, config, settings, bar, done)
    fit = partial(_fit, X_tr, X_va, y_va, kind, config, settings.device, moments, sel)
    return sel, *_fit_in_turn(fit, y_tr, seeds, kind, settings.shuffled_control, done)


def _score(group: list[Cell], kind: str, sel: Any, fits: list, shuffled: np.ndarray | None, y_va: np.ndarray,
           codes: PasscodeConfig, n_boot: int, **common: Any) -> tuple[np.ndarray, list[CellResult]]:
    """One kind's fits on a group scored on the validation split: per-sample accuracy (G, M), and a row per cell."""
    # per-sample scores averaged over seeds: their mean is the mean seed accuracy
    acc_s = np.mean([per_sample_accuracy(f.log_probs, y_va) for f in fits], axis=0)  # (G, M)
    bits_s = np.mean([per_sample_bits(f.log_probs, y_va) for f in fits], axis=0)  # (G, M)
    acc_ci = bootstrap_ci(acc_s, n_boot=n_boot)
    bits_ci = bootstrap_ci(bits_s, n_boot=n_boot)
    wilson = wilson_interval(acc_s.mean(-1), len(y_va))
    digits = np.mean([digit_accuracy(f.log_probs, y_va) for f in fits], axis=0)  # (G, K)
    # the pre-registered seed-0 probe, against the passcodes' own null
    p_values = (binomial_pvalue(fits[0].log_probs, y_va) if codes.digit_sum is None
                else constrained_pvalue(fits[0].log_probs, y_va, allowed_codes(codes)))
    seed_acc = np.stack([f.accuracy for f in fits])  # (S, G)
    epochs = np.max([f.n_steps for f in fits], axis=(0, 2)) if kind == MLP else None  # (G,): MLP n_steps = best epoch
    # any seed's fit, or an inner-split fit that chose its strength (mlp_l2_grid), still improving at its limit
    at_cap = np.any([still_improving_at_limit(f) for f in fits], axis=0) | sel.inner_at_cap  # (G,)
    return acc_s, [CellResult(
        site=cell.site, offset=cell.offset, layer=cell.layer, probe=kind, pooling=cell.pooling, **common,
        accuracy=float(seed_acc[:, g].mean()),
        accuracy_std=float(seed_acc[:, g].std(ddof=1)) if len(fits) > 1 else 0.0,
        accuracy_seeds=[float(a) for a in seed_acc[:, g]], digit_accuracy=[float(a) for a in digits[g]],
        ci_low=float(acc_ci.low[g]), ci_high=float(acc_ci.high[g]),
        wilson_low=float(wilson.low[g]), wilson_high=float(wilson.high[g]),
        bits=float(bits_ci.estimate[g]), bits_low=float(bits_ci.low[g]), bits_high=float(bits_ci.high[g]),
        p_value=float(p_values[g]), shuffled_accuracy=None if shuffled is None else float(shuffled[g]),
        selectivity=None if shuffled is None else float(seed_acc[:, g].mean() - shuffled[g]),
        train_accuracy=float(np.mean([f.train_accuracy[g] for f in fits])),
        l2=float(sel.chosen[g]), l2_grid=[float(v) for v in sel.tried(g)], l2_at_bound=bool(sel.at_bound[g]),
        epochs=None if epochs is None else int(epochs[g]), epochs_at_cap=bool(at_cap[g]),
        l2_inner_accuracy=None if sel.fixed else [float(a) for a in sel.inner_accuracy[g]
                                                  if not np.isnan(a)],  # the values it tried
    ) for g, cell in enumerate(group)]


def probe_store(store: KVStore, condition: str, settings: ProbeConfig = ProbeConfig(), *, progress: bool = True,
                label: str | None = None) -> GridResult:
    """Fit every requested probe on every (site, offset, layer) cell of `store`.

    A probe kind whose strength grid has several values gets its L2 chosen per cell on the inner
    split of the training passcodes, is refitted on the whole training split at that value, and
    is scored on the validation split (the shuffled-label control uses the same value).
    The progress bar (`label`, default "probe CONDITION") counts cell fits: each cell is fitted
    once per strength-grid value, once per seed, and once more for the shuffled-label control.
    """
    labels = store.labels  # (N, K)
    codes = PasscodeConfig.from_description(store.config.get("source", {}).get("passcode", {}))
    chance = codes.chance()
    mask = MaskConfig(**store.config["capture"].get("mask", {})).name
    cells = planned_cells(store, settings)
    tr, va, inner = _splits(store, settings, any(len(settings.strength_grid(k)) > 1 for k in settings.families))
    y_tr, y_va = labels[tr], labels[va]
    common = dict(condition=condition, chance=chance, mask=mask, n_train=len(tr), n_val=len(va))  # on every row
    rows: list[CellResult] = []
    per_sample: dict[tuple[Cell, str], np.ndarray] = {}
    n_fits = sum(_fits_per_cell(settings, kind) for kind in settings.families)
    with tqdm(total=len(cells) * n_fits, desc=label or f"probe {condition}", unit="fit", disable=not progress,
              dynamic_ncols=True) as bar:  # closed on a failure too: the error line comes last
        for group, X_tr, X_va in feature_groups(store, settings, tr, va):  # (G, N_tr, D), (G, N_va, D)
            for kind in settings.families:
                sel, fits, shuffled = _fit_kind(X_tr, y_tr, X_va, y_va, inner, kind, settings, bar)
                acc_s, kind_rows = _score(group, kind, sel, fits, shuffled, y_va, codes, settings.n_boot, **common)
                per_sample.update({(cell, kind): acc_s[g] for g, cell in enumerate(group)})  # (M,) per cell
                rows += kind_rows
    rows.sort(key=lambda r: (r.probe, r.site, r.offset, r.layer))
    return GridResult(condition, rows, store.sample_ids[va], per_sample)


@dataclass
class SensitivityCurve:
    """Accuracy of one cell's linear probe as a function of its L2 strength (lists over `l2`, ascending).

    accuracy, ci_low, ci_high: outer validation accuracy and its 95% bootstrap interval,
    probes fitted on the whole training split at each value (a diagnostic: nothing is chosen
    on it). inner_accuracy: the selection criterion, inner validation accuracy; chosen: the
    value selection picks from `l2` on the inner split.
    """

    condition: str
    site: str
    offset: int
    layer: int
    probe: str
    l2: list[float]
    accuracy: list[float]
    ci_low: list[float]
    ci_high: list[float]
    inner_accuracy: list[float]
    chosen: float
    pooling: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sensitivity_curves(
    store: KVStore, condition: str, settings: ProbeConfig = ProbeConfig(), *,
    cells: Iterable[Cell] | None = None, l2_values: Iterable[float] | None = None,
) -> list[SensitivityCurve]:
    """Linear-probe accuracy against L2 strength for `cells` (None: every cell
    `settings` selects), on the same outer and inner splits as `probe_store`. l2_values: the strengths
    to draw (None: `settings.linear_l2_grid`). Two warm-started regularisation paths per group of
    cells: one on the inner split (the selection criterion), one on the whole training split."""
    values = normalise_grid(settings.strength_grid(LINEAR) if l2_values is None else tuple(l2_values))
    labels = store.labels
    planned = planned_cells(store, settings)
    cells = planned if cells is None else list(cells)
    missing = [c for c in cells if c not in planned]
    if missing:
        raise ValueError(f"cells {missing} are not in store {store.path} with pooling {settings.pooling!r}")
    tr, va, inner = _splits(store, settings, len(values) > 1)
    y_tr, y_va = labels[tr], labels[va]
    curves = []
    for group, X_tr, X_va in feature_groups(store, settings, tr, va, cells):
        moments = shared_moments(X_tr, LINEAR, settings.linear)
        sel = select_strength(X_tr, y_tr, values, inner_val=inner, config=settings.linear, device=settings.device,
                              moments=moments, extend=False)  # the curve's own values
        path = strength_path(X_tr, y_tr, X_va, y_va, values, config=settings.linear, device=settings.device,
                             moments=moments)
        cis = [bootstrap_ci(per_sample_accuracy(f.log_probs, y_va), n_boot=settings.n_boot) for f in path]
        for g, cell in enumerate(group):
            curves.append(SensitivityCurve(
                condition=condition, site=cell.site, offset=cell.offset, layer=cell.layer, probe=LINEAR,
                pooling=cell.pooling,
                l2=[float(v) for v in values], accuracy=[float(f.accuracy[g]) for f in path],
                ci_low=[float(c.low[g]) for c in cis], ci_high=[float(c.high[g]) for c in cis],
                inner_accuracy=[float(a) for a in sel.inner_accuracy[g]], chosen=float(sel.chosen[g]),
            ))
    return curves


def apply_holm(rows: list[CellResult] | list[DiffResult], alpha: float = 0.05) -> None:
    """Holm-correct the p-values of every row of a report together (in place): the cells against
    chance are one family, the paired differences between conditions another."""
    if not rows:
        return
    adjusted = holm([r.p_value for r in rows])
    for r, p in zip(rows, adjusted):
        r.p_holm = float(p)
        r.significant = bool(p <= alpha)


def paired_differences(a: Any, b: Any, n_boot: int = 2000, unit: str = "samples",
                       masks: tuple[str | None, str | None] = (None, None)) -> list[DiffResult]:
    """Paired differences a - b for every (cell, probe) that both results score per sample: the paired
    bootstrap interval of the difference and its paired p-value, in (probe, site, offset, layer) order.

    a, b: results with `condition`, `val_index` (M,) and `per_sample` {(cell, probe): (M,)}: a `GridResult`
    (accuracy) or a reconstruction result (bits per token); both must have scored the same validation `unit`.
    masks: the two conditions' mask names, where they have them.
    """
    if not np.array_equal(a.val_index, b.val_index):
        raise ValueError(
            f"conditions {a.condition!r} and {b.condition!r} were not scored on the same validation {unit} "
            "(capture both from the same source and seed)"
        )
    out = []
    for (cell, probe), sa in a.per_sample.items():
        if (cell, probe) not in b.per_sample:
            continue
        sb = b.per_sample[(cell, probe)]
        ci = paired_bootstrap_ci(sa, sb, n_boot=n_boot)
        out.append(DiffResult(a.condition, b.condition, cell.site, cell.offset, cell.layer, probe,
                              float(ci.estimate), float(ci.low), float(ci.high), a_mask=masks[0], b_mask=masks[1],
                              pooling=cell.pooling, p_value=paired_pvalue(sa, sb)))
    out.sort(key=lambda d: (d.probe, d.site, d.offset, d.layer))
    return out


def compare(a: GridResult, b: GridResult, n_boot: int = 2000) -> list[DiffResult]:
    """Paired differences a - b of accuracy for every cell both grids have."""
    masks = tuple(g.rows[0].mask if g.rows else None for g in (a, b))
    return paired_differences(a, b, n_boot, masks=masks)


def merge_grids(grids: list[GridResult]) -> GridResult:
    """One grid from several probed with different settings on the same condition and split."""
    first = grids[0]
    for g in grids[1:]:
        if g.condition != first.condition or not np.array_equal(g.val_index, first.val_index):
            raise ValueError("merge_grids takes grids of one condition scored on one validation split")
    rows = [r for g in grids for r in g.rows]
    per_sample = {k: v for g in grids for k, v in g.per_sample.items()}
    rows.sort(key=lambda r: (r.probe, r.site, r.offset, r.layer))
    return GridResult(first.condition, rows, first.val_index, per_sample)


def save_grid(grid: GridResult, path: str | Path) -> None:
    """Write a grid as path.json (rows) and path.npz (validation ids and per-sample scores), both or
    neither (`kvprobe.files.together`); the .json is put in place last: its presence means the grid is whole."""
    path = Path(path)
    arrays = {"val_index": grid.val_index}
    for (cell, probe), v in grid.per_sample.items():
        arrays[f"{cell.label}|{probe}"] = v
    with together():
        with replacing(path.with_suffix(".npz"), "wb") as f:
            np.savez_compressed(f, **arrays)
        write_text(path.with_suffix(".json"),
                   json.dumps({"condition": grid.condition, "rows": [asdict(r) for r in grid.rows]}, indent=1))


def load_grid(path: str | Path) -> GridResult:
    """Read a grid written by `save_grid`."""
    path = Path(path)
    data = json.loads(path.with_suffix(".json").read_text())
    arrays = np.load(path.with_suffix(".npz"))
    rows = [CellResult(**r) for r in data["rows"]]
    per_sample = {}
    for name in arrays.files:
        if name == "val_index":
            continue
        *where, probe = name.split("|")
        if len(where) == 3:  # written before cells named their pooling: the rows' pooling
            where.append(next((r.cell.pooling for r in rows), Cell.pooling))
        per_sample[(Cell.parse("|".join(where)), probe)] = arrays[name]
    return GridResult(data["condition"], rows, arrays["val_index"], per_sample)


__getattr__ = renamed(__name__, {"ProbeSettings": "ProbeConfig"})  # the old names, for one release
