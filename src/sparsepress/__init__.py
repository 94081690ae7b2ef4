"""sparsepress: sparsity + quantization for trained models, stored small, run fast on CPUs.

Example:
    >>> import sparsepress as sp
    >>> sp.Recipe.model_validate({"stages": [{"quantize": {"method": "rtn"}}]}).quantize.bits
    8
"""

__version__ = "0.1.0"

from .adaptive import AdaptiveController  # noqa: E402
from .errors import (  # noqa: E402
    ChecksumError,
    FormatError,
    InputError,
    NonFiniteWarning,
    PoisonedWeightError,
    RecipeError,
    SparsepressError,
    TensorLayoutError,
    VersionError,
)
from .experts.adaptive import set_routing  # noqa: E402
from .io import load, save  # noqa: E402
from .nn import QuantizedEmbedding, SparseLinear  # noqa: E402
from .pipeline import compress  # noqa: E402
from .recipe import Recipe  # noqa: E402

__all__ = [
    "AdaptiveController",
    "ChecksumError",
    "FormatError",
    "InputError",
    "NonFiniteWarning",
    "PoisonedWeightError",
    "QuantizedEmbedding",
    "Recipe",
    "RecipeError",
    "SparseLinear",
    "SparsepressError",
    "TensorLayoutError",
    "VersionError",
    "__version__",
    "compress",
    "load",
    "save",
    "set_routing",
]
