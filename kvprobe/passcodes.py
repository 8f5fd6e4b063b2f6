"""Seeded passcodes and the label-unique train/validation split (SPEC section 3).

A passcode is a string over an alphabet (default five decimal digits, 00000-99999).
Labels are the per-character class indices, shape (N, length). The split puts every
occurrence of a passcode on one side, so no passcode is in both train and validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupShuffleSplit

__all__ = ["PasscodeSpec", "label_unique_split", "passcode_labels", "sample_passcodes"]


@dataclass(frozen=True)
class PasscodeSpec:
    """What a passcode looks like."""

    length: int = 5
    alphabet: str = "0123456789"

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"passcode length must be >= 1, got {self.length}")
        if len(self.alphabet) < 2 or len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"passcode alphabet must hold >= 2 distinct characters, got {self.alphabet!r}")

    @property
    def n_classes(self) -> int:
        return len(self.alphabet)


def sample_passcodes(n: int, seed: int, spec: PasscodeSpec = PasscodeSpec()) -> list[str]:
    """`n` passcodes drawn uniformly and independently (repeats allowed, as in the paper)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, spec.n_classes, size=(n, spec.length))  # (N, L)
    alphabet = np.array(list(spec.alphabet))
    return ["".join(row) for row in alphabet[idx]]


def passcode_labels(passcodes: list[str], spec: PasscodeSpec = PasscodeSpec()) -> np.ndarray:
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
