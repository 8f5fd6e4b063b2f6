"""Seeded passcodes and the label-unique train/validation split (SPEC section 3).

A passcode is a string over an alphabet (default five decimal digits, 00000-99999).
Labels are the per-character class indices, shape (N, length). The split puts every
occurrence of a passcode on one side, so no passcode is in both train and validation.

`PasscodeConfig(digit_sum=22)` draws only the passcodes whose digits sum to 22: on the toy,
whose mementos are running sums, every memento text is then the same whatever the
passcode, so what a probe reads at a masked memento is the implicit KV channel alone.
Chance is then no longer 1/10 per digit: `chance()` is the exact per-digit majority-class
baseline under that distribution (11.17% for five decimal digits summing to 22).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import renamed

__all__ = ["PasscodeConfig", "allowed_codes", "label_unique_split", "passcode_labels", "sample_passcodes"]

MAX_ENUMERATED = 10**6  # passcode spaces up to this size can be constrained to a digit sum


@dataclass(frozen=True)
class PasscodeConfig:
    """What a passcode looks like."""

    length: int = 5
    alphabet: str = "0123456789"
    digit_sum: int | None = None  # only passcodes whose class indices sum to this; None: all

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"passcode length must be >= 1, got {self.length}")
        if len(self.alphabet) < 2 or len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"passcode alphabet must hold >= 2 distinct characters, got {self.alphabet!r}")
        if self.digit_sum is not None:
            top = self.length * (self.n_classes - 1)
            if not 0 <= self.digit_sum <= top:
                raise ValueError(f"digit_sum must be in 0..{top} for {self.length} characters, got {self.digit_sum}")
            if self.n_classes**self.length > MAX_ENUMERATED:
                raise ValueError(f"digit_sum needs a passcode space of at most {MAX_ENUMERATED:,} codes")

    @property
    def n_classes(self) -> int:
        return len(self.alphabet)

    def chance(self) -> float:
        """Accuracy of the best guess without features: the mean over positions of the
        most likely class's probability (1 / n_classes for unconstrained passcodes)."""
        if self.digit_sum is None:
            return 1.0 / self.n_classes
        codes = allowed_codes(self)  # (C, L)
        counts = np.stack([np.bincount(codes[:, k], minlength=self.n_classes) for k in range(self.length)])
        return float((counts.max(axis=1) / len(codes)).mean())

    def describe(self) -> dict:
        d = {"length": self.length, "alphabet": self.alphabet, "chance": self.chance()}
        if self.digit_sum is not None:
            d["digit_sum"] = self.digit_sum
        return d

    @classmethod
    def from_description(cls, d: dict) -> "PasscodeConfig":
        """The spec a sample source's `describe()["passcode"]` names (extra keys ignored)."""
        return cls(length=d.get("length", 5), alphabet=d.get("alphabet", "0123456789"), digit_sum=d.get("digit_sum"))


def allowed_codes(spec: PasscodeConfig) -> np.ndarray:
    """Class indices of every passcode the spec allows, in lexicographic order. (C, length)"""
    return _allowed(spec.length, spec.n_classes, spec.digit_sum).copy()


@lru_cache(maxsize=8)
def _allowed(length: int, n_classes: int, digit_sum: int | None) -> np.ndarray:
    if n_classes**length > MAX_ENUMERATED:
        raise ValueError(f"cannot enumerate {n_classes}^{length} passcodes")
    grid = np.indices((n_classes,) * length).reshape(length, -1).T  # (C, L), lexicographic
    return grid if digit_sum is None else grid[grid.sum(axis=1) == digit_sum]


def sample_passcodes(n: int, seed: int, spec: PasscodeConfig = PasscodeConfig()) -> list[str]:
    """`n` passcodes drawn uniformly and independently (repeats allowed, as in the paper);
    with `spec.digit_sum`, uniformly among the passcodes with that digit sum."""
    rng = np.random.default_rng(seed)
    if spec.digit_sum is None:
        idx = rng.integers(0, spec.n_classes, size=(n, spec.length))  # (N, L)
    else:
        codes = allowed_codes(spec)
        idx = codes[rng.integers(0, len(codes), size=n)]  # (N, L)
    alphabet = np.array(list(spec.alphabet))
    return ["".join(row) for row in alphabet[idx]]


def passcode_labels(passcodes: list[str], spec: PasscodeConfig = PasscodeConfig()) -> np.ndarray:
    """Class index of each character: (N, length) int64."""
    lookup = {c: i for i, c in enumerate(spec.alphabet)}
    out = np.empty((len(passcodes), spec.length), dtype=np.int64)
    for n, code in enumerate(passcodes):
        if len(code) != spec.length or any(c not in lookup for c in code):
            raise ValueError(f"passcode {code!r} is not {spec.length} characters from {spec.alphabet!r}")
        out[n] = [lookup[c] for c in code]
    return out


def label_unique_split(passcodes: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean (N,) array, True for validation; no passcode appears on both sides."""
    from sklearn.model_selection import GroupShuffleSplit  # a second to import: only where a split is made

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups = np.asarray(passcodes)
    if len(np.unique(groups)) < 2:
        raise ValueError("a label-unique split needs at least two distinct passcodes")
    splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    _, val_idx = next(splitter.split(groups, groups=groups))
    is_val = np.zeros(len(groups), dtype=bool)
    is_val[val_idx] = True
    return is_val


__getattr__ = renamed(__name__, {"PasscodeSpec": "PasscodeConfig"})  # the old names, for one release
