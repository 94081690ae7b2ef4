"""Errors a user can cause, each naming its culprit.

Example:
    >>> from sparsepress.errors import RecipeError
    >>> str(RecipeError("stages[0].prune.method", "foo", "magnitude | wanda | sparsegpt"))
    "recipe field 'stages[0].prune.method': got 'foo'; allowed: magnitude | wanda | sparsegpt"
"""

from __future__ import annotations

from pathlib import Path


class SparsepressError(Exception):
    """Base class of every error sparsepress raises on purpose.

    Example:
        >>> issubclass(FormatError, SparsepressError)
        True
    """


class RecipeError(SparsepressError, ValueError):
    """A recipe is invalid: names the field, the bad value and what is allowed.

    Example:
        >>> RecipeError("format", "zip", "auto | dense").field
        'format'
    """

    def __init__(self, field: str, value: object, allowed: str, line: int | None = None):
        self.field, self.value, self.allowed, self.line = field, value, allowed, line
        where = f" (line {line})" if line is not None else ""
        super().__init__(f"recipe field '{field}'{where}: got {value!r}; allowed: {allowed}")


class InputError(SparsepressError, ValueError):
    """A user-supplied input (path, model, calibration text) cannot be used.

    Example:
        >>> str(InputError("/nope", "no such folder"))
        '/nope: no such folder'
    """

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class GridError(SparsepressError, ValueError):
    """A sweep grid is invalid: names the dotted path (or top-level key) at fault and why.

    Example:
        >>> str(GridError("vary.stages.0.prune.sparsty", "unknown key"))
        "grid 'vary.stages.0.prune.sparsty': unknown key"
    """

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"grid '{path}': {problem}")


class FormatError(SparsepressError, ValueError):
    """A stored model folder or tensor is damaged, foreign or from a newer format version.

    Example:
        >>> str(FormatError("out/sparsepress.json", "checksum mismatch"))
        'out/sparsepress.json: checksum mismatch'
    """

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class ChecksumError(FormatError):
    """The tensors file does not match the sha256 recorded in the manifest."""


class VersionError(FormatError):
    """The folder was written by a newer, unknown format version."""


class TensorLayoutError(FormatError):
    """A stored tensor is missing or has the wrong shape or dtype for its format."""


class PoisonedWeightError(SparsepressError, ValueError):
    """A weight or a calibration activation holds NaN or Inf.

    Example:
        >>> str(PoisonedWeightError("encoder.layer.0.attention.self.query", "weight"))
        'encoder.layer.0.attention.self.query: NaN or Inf in weight'
    """

    def __init__(self, layer: str, what: str):
        self.layer, self.what = layer, what
        super().__init__(f"{layer}: NaN or Inf in {what}")


class NonFiniteWarning(UserWarning):
    """With `nonfinite="skip"`: NaN / Inf weights were zeroed or calibration tokens dropped, layer named.

    Example:
        >>> issubclass(NonFiniteWarning, UserWarning)
        True
    """
