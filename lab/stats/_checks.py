"""Input checks shared by the lab.stats modules: each raises ValueError saying what it received."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_open_unit(name: str, value: float, upper: float = 1.0) -> float:
    value = float(value)
    if not 0.0 < value < upper:
        raise ValueError(f"{name} must lie strictly between 0 and {upper:g}; got {value!r}")
    return value


def check_count(name: str, value: int, minimum: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer; got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}; got {value}")
    return value


def bool_array(name: str, values: object, ndim: int) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype != np.bool_:
        raise ValueError(f"{name} must be a boolean array; got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty; got shape {array.shape}")
    return array


def paired_bool(correct_a: object, correct_b: object) -> tuple[np.ndarray, np.ndarray]:
    a = bool_array("correct_a", correct_a, 1)
    b = bool_array("correct_b", correct_b, 1)
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must have equal length; got {a.size} and {b.size}")
    return a, b


def real_vector(name: str, values: object) -> np.ndarray:
    array = np.asarray(values)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must hold real numbers; got dtype {array.dtype}")
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array; got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite; got {np.count_nonzero(~np.isfinite(array))} nan/inf values")
    return array.astype(np.float64)
