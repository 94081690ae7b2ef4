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
    UnsupportedModelError,
    VersionError,
)
from .experts.adaptive import set_routing  # noqa: E402
from .io import load, save  # noqa: E402
from .nn import (  # noqa: E402
    QuantizedEmbedding,
    SparseLinear,
    set_activation_sparsity,
    set_num_threads,
    set_sparsity,
)
from .pipeline import compress  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .interop.hf.quantizer import register as _register_with_transformers  # noqa: E402
from .interop.sentence_transformers import load_sentence_transformer  # noqa: E402

_register_with_transformers()  # AutoModel*.from_pretrained reads sparsepress folders from here on

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
    "UnsupportedModelError",
    "VersionError",
    "__version__",
    "compress",
    "load",
    "load_sentence_transformer",
    "save",
    "set_activation_sparsity",
    "set_num_threads",
    "set_sparsity",
    "set_routing",
]
