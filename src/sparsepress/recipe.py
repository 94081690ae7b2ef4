"""Recipes: the validated, YAML-loadable description of a compression run (DESIGN section 3).

Example:
    >>> from sparsepress.recipe import Recipe
    >>> r = Recipe.model_validate({"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}]})
    >>> r.prune.method, r.prune.sparsity
    ('wanda', 0.5)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError, RecipeError

_STRICT = ConfigDict(extra="forbid", frozen=True)

_NM_RE = re.compile(r"^(\d+):(\d+)$")
STRUCTURED_PATTERNS = ("channel", "head", "layer")
# Structured importance scores by pattern: the first is the default of method magnitude, the second of
# the calibrated methods (wanda, sparsegpt).
STRUCTURED_SCORES = {
    "channel": ("magnitude", "activation", "taylor"),
    "head": ("magnitude", "activation", "taylor"),
    "layer": ("influence", "loss"),
}
NAMED_PATTERNS = ("unstructured", "bbs", "block", *STRUCTURED_PATTERNS)
_PATTERN_ALLOWED = " | ".join(NAMED_PATTERNS) + " | N:M with 0 < N < M (e.g. '2:4')"


class Pattern(BaseModel):
    """A parsed sparsity pattern: `unstructured`, N:M, `bbs`, `block` or a structured one.

    Example:
        >>> Pattern.parse("2:4").n, Pattern.parse("2:4").m
        (2, 4)
        >>> Pattern.parse("unstructured").kind
        'unstructured'
    """

    model_config = _STRICT
    kind: Literal["unstructured", "nm", "bbs", "block", "channel", "head", "layer"]
    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        match = _NM_RE.match(str(text).strip())
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if m < 2 or not 0 < n < m:
                raise RecipeError("pattern", text, _PATTERN_ALLOWED)
            return cls(kind="nm", n=n, m=m)
        if text not in NAMED_PATTERNS:
            raise RecipeError("pattern", text, _PATTERN_ALLOWED)
        return cls(kind=text)

    @property
    def is_structured(self) -> bool:
        return self.kind in STRUCTURED_PATTERNS

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def _check_fraction(value: float, what: str) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what} in [0, 1)")
    return value


def _check_regexes(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
    return patterns


class _TargetedStage(BaseModel):
    model_config = _STRICT
    targets: list[str] = Field(default_factory=lambda: [".*"])
    ignore: list[str] = Field(default_factory=list)

    _regexes = field_validator("targets", "ignore")(classmethod(lambda cls, v: _check_regexes(v)))


class PruneStage(_TargetedStage):
    """Prune Linear weights: `method` x `pattern` at `sparsity`, allocated per layer by `allocation`.

    Example:
        >>> PruneStage(method="sparsegpt", pattern="2:4").layer_sparsity_levels
        [0.5]
    """

    kind: ClassVar[str] = "prune"
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    pattern: str = "unstructured"
    sparsity: float | list[float] | None = None
    bank: int = Field(64, ge=2, le=4096)
    block_shape: tuple[int, int] = (1, 16)
    allocation: Literal["uniform", "owl", "sensitivity"] = "uniform"
    owl_lambda: float = Field(0.08, ge=0.0, lt=1.0)
    owl_threshold: float = Field(5.0, gt=0.0)
    blocksize: int = Field(128, ge=1)
    dampening: float = Field(0.01, gt=0.0, le=1.0)
    score: Literal["magnitude", "activation", "taylor", "influence", "loss"] | None = None

    @field_validator("pattern")
    @classmethod
    def _pattern_parses(cls, value: str) -> str:
        Pattern.parse(value)
        return value

    @field_validator("sparsity")
    @classmethod
    def _sparsity_in_range(cls, value: float | list[float] | None) -> float | list[float] | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("a list of elastic sparsity levels cannot be empty")
            for level in value:
                _check_fraction(level, "each sparsity level")
            if sorted(value) != value or len(set(value)) != len(value):
                raise ValueError(f"elastic sparsity levels must be strictly increasing, got {value}")
        elif value is not None:
            _check_fraction(value, "sparsity")
        return value

    @field_validator("block_shape")
    @classmethod
    def _block_positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"block_shape entries must be >= 1, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "PruneStage":
        pattern = self.parsed_pattern
        if pattern.kind == "nm":
            implied = 1.0 - pattern.n / pattern.m
            if self.sparsity is not None and (isinstance(self.sparsity, list) or abs(self.sparsity - implied) > 1e-9):
                raise RecipeError("sparsity", self.sparsity, f"omit it or {implied:g} (pattern {self.pattern} implies {implied:g})")
            if self.allocation != "uniform":
                raise RecipeError("allocation", self.allocation, f"uniform (the fixed pattern {self.pattern} cannot vary sparsity per layer)")
        if pattern.is_structured:
            if self.sparsity is None:
                raise RecipeError("sparsity", None, f"a fraction in [0, 1) (pattern {self.pattern} needs one)")
            self._check_structured(pattern.kind)
        elif self.score is not None:
            raise RecipeError("score", self.score, f"omit it (scores choose channels, heads or layers; pattern {self.pattern} uses method {self.method})")
        return self

    def _check_structured(self, kind: str) -> None:
        if isinstance(self.sparsity, list):
            raise RecipeError("sparsity", self.sparsity, f"one fraction (pattern {kind} removes whole units once)")
        allowed_allocation = ("uniform",) if kind == "layer" else ("uniform", "sensitivity")
        if self.allocation not in allowed_allocation:
            raise RecipeError("allocation", self.allocation, " | ".join(allowed_allocation) + f" (pattern {kind})")
        if self.score is not None and self.score not in STRUCTURED_SCORES[kind]:
            raise RecipeError("score", self.score, " | ".join(STRUCTURED_SCORES[kind]) + f" (pattern {kind})")

    @property
    def structured_score(self) -> str:
        """The importance score of a structured pattern: `score`, or the method's default.

        Example:
            >>> PruneStage(method="wanda", pattern="channel", sparsity=0.5).structured_score
            'activation'
        """
        scores = STRUCTURED_SCORES[self.parsed_pattern.kind]
        return self.score or (scores[0] if self.method == "magnitude" or len(scores) < 3 else scores[1])

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern)

    @property
    def layer_sparsity_levels(self) -> list[float]:
        """The mean sparsity levels asked for: one, or several nested elastic levels."""
        pattern = self.parsed_pattern
        if pattern.kind == "nm":
            return [1.0 - pattern.n / pattern.m]
        if self.sparsity is None:  # a budget's allocation chooses it
            return []
        return list(self.sparsity) if isinstance(self.sparsity, list) else [float(self.sparsity)]


class QuantizeStage(_TargetedStage):
    """Quantize Linear weights with round-to-nearest or GPTQ, per channel or per group.

    Example:
        >>> QuantizeStage(method="gptq", bits=4, group_size=128).bits
        4
    """

    kind: ClassVar[str] = "quantize"
    method: Literal["rtn", "gptq"] = "gptq"
    bits: Literal[8, 4] = 8
    group_size: int | None = Field(None, ge=8)
    act_order: bool = True
    blocksize: int = Field(128, ge=1)
    dampening: float = Field(0.01, gt=0.0, le=1.0)


class QuantizeEmbeddingsStage(BaseModel):
    """Quantize embedding tables row-wise (one scale per row); with `head`, the output embeddings too.

    `head: true` quantizes the LM head (the model's `get_output_embeddings()`) with the same bits, one
    scale per output row, run by the int8 kernels; a head tied to the input embedding is quantized
    once and both share it. `head_sparsity` (with `head`) first prunes that fraction of each head row
    by Wanda's score (|weight| x input norm over the calibration's final hidden states); a tied head
    cannot be pruned (its rows are the input embeddings too).

    Example:
        >>> QuantizeEmbeddingsStage(bits=8, head=True, head_sparsity=0.5).head_sparsity
        0.5
    """

    model_config = _STRICT
    kind: ClassVar[str] = "quantize_embeddings"
    bits: Literal[8, 4] = 8
    head: bool = False
    head_sparsity: float = 0.0

    @field_validator("head_sparsity")
    @classmethod
    def _fraction(cls, value: float) -> float:
        return _check_fraction(value, "head_sparsity")

    @model_validator(mode="after")
    def _sparsity_needs_head(self) -> "QuantizeEmbeddingsStage":
        if self.head_sparsity > 0 and not self.head:
            raise ValueError("head_sparsity prunes the LM head: set head: true as well")
        return self


class ActivationSparsityStage(_TargetedStage):
    """Zero the smallest inputs of each Linear at run time (thresholds calibrated per layer).

    `sparsity` is the level a loaded model starts at; thresholds are stored for every level of
    `levels` (default: 0.25, 0.4, 0.5, 0.6 and `sparsity`), so `sp.set_activation_sparsity` can switch
    between them (0 turns it off). `targets` / `ignore`: regexes over the Linear layers inside blocks.

    Example:
        >>> ActivationSparsityStage(sparsity=0.4).ladder
        [0.25, 0.4, 0.5, 0.6]
        >>> ActivationSparsityStage(sparsity=0.3, levels=[0.5]).ladder
        [0.3, 0.5]
    """

    kind: ClassVar[str] = "activation_sparsity"
    sparsity: float
    levels: list[float] | None = None

    _fraction = field_validator("sparsity")(classmethod(lambda cls, v: _check_fraction(v, "sparsity")))

    @field_validator("levels")
    @classmethod
    def _levels_in_range(cls, value: list[float] | None) -> list[float] | None:
        for level in value or []:
            if not 0.0 < level < 1.0:
                raise ValueError(f"each activation sparsity level in (0, 1), got {level}")
        return value

    @property
    def ladder(self) -> list[float]:
        """Every stored level (0, "off", is always available besides these)."""
        base = DEFAULT_ACTIVATION_LEVELS if self.levels is None else self.levels
        return sorted({round(float(v), 6) for v in [*base, self.sparsity] if v > 0})


DEFAULT_ACTIVATION_LEVELS = (0.25, 0.4, 0.5, 0.6)


class DistillStage(BaseModel):
    """Recover quality by fine-tuning the compressed model toward the dense teacher, masks kept.

    `steps` optimizer steps of AdamW (`lr`, `weight_decay`) on `batch_size` calibration samples cropped
    to `seq_len` tokens; the learning rate warms up over `warmup` of the steps, then follows
    `schedule`. The loss weighs the final output (`output`: the pooled embedding's cosine for
    encoders, the logits' KL divergence for causal LMs), every block's hidden states (`hidden`) and,
    for encoders, the in-batch similarity matrix of the pooled embeddings (`similarity`).
    `rounds` > 1 removes the structured units and prunes in that many rounds on a cubic schedule
    with `steps / rounds` distillation steps after each. `checkpoint_every`: steps between checkpoints
    of a resumable run.

    Example:
        >>> DistillStage(steps=10).lr
        0.0001
    """

    model_config = _STRICT
    kind: ClassVar[str] = "distill"
    steps: int = Field(300, ge=1)
    lr: float = Field(1.0e-4, gt=0.0)
    batch_size: int = Field(16, ge=1)
    seq_len: int = Field(64, ge=2)
    warmup: float = Field(0.1, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    output: float = Field(1.0, ge=0.0)
    hidden: float = Field(1.0, ge=0.0)
    similarity: float = Field(1.0, ge=0.0)
    rounds: int = Field(1, ge=1, le=20)
    checkpoint_every: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _some_loss(self) -> "DistillStage":
        if self.output == 0 and self.hidden == 0 and self.similarity == 0:
            raise RecipeError("output", 0, "a positive weight for at least one of output, hidden, similarity")
        if self.rounds > self.steps:
            raise RecipeError("rounds", self.rounds, f"at most steps ({self.steps}): each round distills")
        return self


class ExpertsStage(BaseModel):
    """Mixture-of-experts models: remove or merge experts, allocate sparsity by expert usage, route adaptively.

    `prune`: fraction of each MoE layer's experts removed (at least top-k kept), the least useful `by`
    frequency (tokens routed), gate_mass (routing weight received), reap (router-weighted expert output
    norm) or random (a baseline; seeded by the recipe's seed); `merge`: fold each removed expert into its
    most similar kept one (router-logit correlation; neurons aligned, weights averaged by frequency)
    instead of dropping it. `allocation: usage` spreads the prune stage's sparsity over a layer's experts
    by their share of gate mass (`s_e = s - temperature * log(E * usage_e)`, recentred on the same
    mean: hot experts keep more weights). `top_p` (adaptive routing): per token, the fewest of its top-k
    experts whose share of the top-k gate mass reaches top_p; `auto` picks the lowest measured top_p whose
    calibration loss rises by at most `max_loss_rise`. `min_tokens`: routed calibration tokens an expert
    matrix needs before its statistics are its own alone (default: its input width; fewer are pooled
    with the statistics of every token sent through that expert).

    Example:
        >>> ExpertsStage(prune=0.25, by="reap").merge
        False
    """

    model_config = _STRICT
    kind: ClassVar[str] = "experts"
    prune: float = 0.0
    by: Literal["frequency", "gate_mass", "reap", "random"] = "reap"
    merge: bool = False
    top_p: float | Literal["auto"] | None = None
    max_loss_rise: float = Field(0.02, ge=0.0, lt=1.0)
    allocation: Literal["uniform", "usage"] = "uniform"
    usage_temperature: float = Field(0.05, gt=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=1)

    _fraction = field_validator("prune")(classmethod(lambda cls, v: _check_fraction(v, "prune")))

    @field_validator("top_p")
    @classmethod
    def _top_p_in_range(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError("top_p in (0, 1], auto or null")
        return value


StageConfig = Union[PruneStage, QuantizeStage, QuantizeEmbeddingsStage, ActivationSparsityStage, DistillStage,
                    ExpertsStage]
STAGE_TYPES: dict[str, type[BaseModel]] = {
    stage.kind: stage  # type: ignore[attr-defined]
    for stage in (PruneStage, QuantizeStage, QuantizeEmbeddingsStage, ActivationSparsityStage, DistillStage,
                  ExpertsStage)
}


class Budget(BaseModel):
    """What the allocator must meet (all given targets at once), and the options it may choose from.

    `size_mb`: bytes of the tensors file / 1e6; `latency_ms`: one forward of `batch` x `seq_len` tokens on
    this machine; `min_fidelity`: fidelity to the dense model as `sparsepress eval` reports it (the
    smallest model meeting it is chosen). Each targeted Linear gets one of `sparsities` x `patterns` x
    `bits`, each embedding table one of `embedding_bits` (32: left unquantized). `verify_rounds`: how
    often a measured miss (or, for `min_fidelity`, a clear overshoot) is corrected by compressing again.

    Example:
        >>> Budget(size_mb=12).size_mb, Budget(size_mb=12).bits
        (12.0, [8, 4])
    """

    model_config = _STRICT
    size_mb: float | None = Field(None, gt=0)
    latency_ms: float | None = Field(None, gt=0)
    batch: int = Field(1, ge=1)
    seq_len: int = Field(128, ge=1)
    min_fidelity: float | None = Field(None, gt=0, le=1)
    sparsities: list[float] = Field(default_factory=lambda: [0.0, 0.5, 0.6, 0.7, 0.8, 0.9])
    patterns: list[str] = Field(default_factory=lambda: ["unstructured"])
    bits: list[Literal[8, 4]] = Field(default_factory=lambda: [8, 4])
    embedding_bits: list[Literal[32, 8, 4]] = Field(default_factory=lambda: [8, 4])
    verify_rounds: int = Field(2, ge=0, le=10)

    @field_validator("sparsities")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("at least one sparsity option")
        for level in value:
            _check_fraction(level, "each sparsity option")
        return sorted(set(value))

    @field_validator("patterns")
    @classmethod
    def _patterns_parse(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one pattern option")
        for pattern in value:
            if Pattern.parse(pattern).kind not in ("unstructured", "nm", "bbs"):
                raise ValueError(f"budget patterns are unstructured | N:M | bbs, got {pattern!r}")
        return value

    @field_validator("bits", "embedding_bits")
    @classmethod
    def _some(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("at least one option")
        return sorted(set(value), reverse=True)

    @model_validator(mode="after")
    def _one_target(self) -> "Budget":
        if self.size_mb is None and self.latency_ms is None and self.min_fidelity is None:
            raise ValueError("a budget needs one of size_mb, latency_ms or min_fidelity")
        return self


class Solver(BaseModel):
    """How the calibrated solves (SparseGPT, Wanda, GPTQ) fit each layer; the defaults are the measured best.

    `sequential`: the layers of a block are solved in the order they run, each seeing inputs already
    produced by the compressed layers before it (not the dense ones). `dense_target` (0..1): how far each
    layer aims at the dense model's output on the dense model's own inputs rather than at its dense
    weight on its compressed inputs; errors stop piling up block to block, and 1 over-fits the
    calibration set (MiniLM: 0.3-0.5 best). `refit`: after pruning, the kept weights of each row are
    refitted by least squares on the calibration Hessian, mask fixed (before GPTQ). `bias_correction`:
    a layer's bias absorbs the mean difference between its compressed and dense outputs. `mask_search`
    (SparseGPT): iterations of an ADMM search for a second mask over the whole layer; whichever of it
    and the sweep's mask leaves the smaller error is kept (0: the sweep's mask only).

    Example:
        >>> Solver(dense_target=0.0).sequential
        True
    """

    model_config = _STRICT
    sequential: bool = True
    dense_target: float = Field(0.3, ge=0.0, le=1.0)
    refit: bool = True
    bias_correction: bool = True
    mask_search: int = Field(30, ge=0, le=1000)

    @property
    def follows_dense_model(self) -> bool:
        """Whether the run must carry the dense model's activations beside the compressed ones."""
        return self.dense_target > 0 or self.bias_correction


FORMAT_NAMES = ("auto", "dense", "bitmask", "nm", "bbs", "csr")


class Recipe(BaseModel):
    """A whole compression recipe: ordered stages, an optional budget and the storage format.

    Example:
        >>> Recipe.model_validate({"stages": [{"quantize": {"method": "rtn"}}], "format": "dense"}).format
        'dense'
    """

    model_config = _STRICT
    stages: list[StageConfig]
    budget: Budget | None = None
    format: Literal["auto", "dense", "bitmask", "nm", "bbs", "csr"] = "auto"
    solver: Solver = Field(default_factory=Solver)
    seed: int = 0

    @field_validator("stages", mode="before")
    @classmethod
    def _unwrap_stages(cls, raw: Any) -> list[BaseModel]:
        if not isinstance(raw, list) or not raw:
            raise ValueError("stages must be a non-empty list of single-key mappings such as {prune: {...}}")
        stages = []
        for index, item in enumerate(raw):
            if isinstance(item, BaseModel):
                stages.append(item)
                continue
            if not isinstance(item, dict) or len(item) != 1:
                raise RecipeError(f"stages[{index}]", item, "one mapping with a single stage key: " + " | ".join(STAGE_TYPES))
            (name, body), = item.items()
            if name not in STAGE_TYPES:
                raise RecipeError(f"stages[{index}]", name, " | ".join(STAGE_TYPES))
            try:
                stages.append(STAGE_TYPES[name].model_validate(body or {}))
            except ValidationError as exc:
                raise _first_error(exc, prefix=f"stages[{index}].{name}") from None
        return stages

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        counts: dict[str, int] = {}
        for stage in self.stages:
            kind = stage.kind  # type: ignore[attr-defined]
            if isinstance(stage, PruneStage) and stage.parsed_pattern.is_structured:
                kind = f"prune (pattern {stage.pattern})"
            counts[kind] = counts.get(kind, 0) + 1
        for kind, count in counts.items():
            if count > 1:
                raise RecipeError("stages", kind.split()[0], f"each stage kind at most once, plus one prune stage per structured pattern ({kind!r} appears {count} times)")
        prune = self.prune
        if prune is not None and prune.sparsity is None and prune.parsed_pattern.kind != "nm" and self.budget is None:
            raise RecipeError(f"stages[{self.stages.index(prune)}].prune.sparsity", None,
                              f"a fraction in [0, 1) (pattern {prune.pattern} needs one, unless a budget chooses it)")
        if self.budget is not None and prune is not None and prune.sparsity is not None:
            raise RecipeError(f"stages[{self.stages.index(prune)}].prune.sparsity", prune.sparsity,
                              "no value with a budget (its allocation chooses each layer's sparsity)")
        if self.format == "nm" and (prune is None or prune.parsed_pattern.kind != "nm"):
            raise RecipeError("format", self.format, "auto | dense | bitmask | csr (format nm needs a prune stage with an N:M pattern such as '2:4')")
        if self.format == "bbs" and (prune is None or prune.parsed_pattern.kind != "bbs"):
            raise RecipeError("format", self.format, "auto | dense | bitmask | csr (format bbs needs a prune stage with pattern 'bbs')")
        return self

    def stage(self, kind: str) -> BaseModel | None:
        """The stage of that kind, or None (for `prune`: the one that is not structured)."""
        if kind == "prune":
            return self.prune
        return next((s for s in self.stages if s.kind == kind), None)  # type: ignore[attr-defined]

    @property
    def prune(self) -> PruneStage | None:
        """The prune stage of the layer solve (unstructured, N:M, bbs, block), or None."""
        return next((s for s in self.stages if isinstance(s, PruneStage) and not s.parsed_pattern.is_structured), None)

    @property
    def structured(self) -> list[PruneStage]:
        """The prune stages with a structured pattern (channel, head, layer), in recipe order.

        Example:
            >>> r = Recipe.model_validate({"stages": [{"prune": {"pattern": "channel", "sparsity": 0.5}},
            ...                                       {"prune": {"sparsity": 0.5}}]})
            >>> [s.pattern for s in r.structured], r.prune.pattern
            (['channel'], 'unstructured')
        """
        return [s for s in self.stages if isinstance(s, PruneStage) and s.parsed_pattern.is_structured]

    @property
    def distill(self) -> DistillStage | None:
        return next((s for s in self.stages if isinstance(s, DistillStage)), None)

    @property
    def quantize(self) -> QuantizeStage | None:
        return self.stage("quantize")  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """The recipe in its YAML shape (what `from_yaml` reads back)."""
        body = self.model_dump(mode="json", exclude_none=True)
        body["stages"] = [{s.kind: s.model_dump(mode="json", exclude_none=True)} for s in self.stages]  # type: ignore[attr-defined]
        return body

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        """Load and validate a YAML recipe; any mistake raises one RecipeError naming field and line.

        Example:
            >>> import tempfile, os
            >>> p = os.path.join(tempfile.mkdtemp(), "r.yaml")
            >>> _ = open(p, "w").write("stages:\\n  - quantize: {method: rtn, bits: 8}\\n")
            >>> Recipe.from_yaml(p).quantize.method
            'rtn'
        """
        path = Path(path)
        if path.is_dir():
            raise InputError(path, "is a folder; expected a YAML recipe file")
        if not path.is_file():
            raise InputError(path, "recipe file not found")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(path, f"cannot read recipe: {exc}") from None
        return cls.from_yaml_text(text, source=str(path))

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "<recipe>") -> "Recipe":
        """Validate recipe YAML given as text (see `from_yaml`)."""
        try:
            data = yaml.safe_load(text)
            lines = _yaml_lines(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise RecipeError("<yaml>", getattr(exc, "problem", str(exc)), f"valid YAML ({source})", line) from None
        if not isinstance(data, dict):
            raise RecipeError("<top level>", data, "a mapping with 'stages' (and optional 'budget', 'format', 'solver', 'seed')", 1)
        try:
            return cls.model_validate(data)
        except RecipeError as exc:
            raise RecipeError(exc.field, exc.value, exc.allowed, lines.get(exc.field)) from None
        except ValidationError as exc:
            raise _first_error(exc, lines=lines) from None


def _first_error(exc: ValidationError, prefix: str = "", lines: dict[str, int] | None = None) -> RecipeError:
    """Turn pydantic's first complaint into one RecipeError naming field, value and what is allowed."""
    error = exc.errors()[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, RecipeError):
        nested = f"{prefix}.{cause.field}" if prefix and not cause.field.startswith("stages") else cause.field
        return RecipeError(nested, cause.value, cause.allowed, (lines or {}).get(nested))
    field = _join_loc(prefix, error["loc"])
    if error["type"] == "missing":
        return RecipeError(field, "<missing>", "a value: this field is required", (lines or {}).get(field.rsplit(".", 1)[0]))
    if error["type"] == "extra_forbidden":
        owner = field.rsplit(".", 1)[0] if "." in field else ""
        allowed = _known_keys(exc.title, owner, error) or "the documented keys"
        return RecipeError(field, field.rsplit(".", 1)[-1], f"known keys: {allowed}", (lines or {}).get(field))
    value = error.get("input")
    allowed = error["msg"]
    if error["type"] == "literal_error":
        allowed = error.get("ctx", {}).get("expected", allowed).replace(" or ", ", ").replace("'", "")
        allowed = " | ".join(part.strip() for part in allowed.split(","))
    elif allowed.startswith("Value error, "):
        allowed = allowed[len("Value error, "):]
    return RecipeError(field or "<recipe>", value, allowed, (lines or {}).get(field))


def _join_loc(prefix: str, loc: tuple[Any, ...]) -> str:
    parts = [prefix] if prefix else []
    for part in loc:
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1]}[{part}]"] if parts else [f"[{part}]"]
        elif part in ("function-after[_check_fraction(), float]",) or _is_type_tag(str(part)):
            continue  # pydantic names union members ('float', 'list[float]') in error locations
        else:
            parts.append(str(part))
    return ".".join(parts)


def _is_type_tag(part: str) -> bool:
    return part in ("float", "int", "str", "bool", "none") or "[" in part or "(" in part


def _known_keys(title: str, owner: str, error: dict[str, Any]) -> str:
    model = {m.__name__: m for m in (Recipe, Budget, Solver, *STAGE_TYPES.values())}.get(title)
    if owner.endswith("budget"):
        model = Budget
    elif owner.endswith("solver"):
        model = Solver
    elif owner.split(".")[-1] in STAGE_TYPES:
        model = STAGE_TYPES[owner.split(".")[-1]]
    elif "." not in owner and not owner.startswith("stages"):
        model = Recipe
    return ", ".join(model.model_fields) if model is not None else ""


def _yaml_lines(text: str) -> dict[str, int]:
    """Map dotted recipe field paths (as errors name them) to their 1-based YAML line."""
    root = yaml.compose(text)
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                name = str(key.value)
                if name in seen:  # PyYAML keeps the last silently; a recipe must say one thing
                    field = f"{path}.{name}" if path else name
                    raise RecipeError(field, name, "each key once per mapping (duplicate key)", key.start_mark.line + 1)
                seen.add(name)
                if path.startswith("stages[") and path.count(".") == 0 and path.endswith("]"):
                    child = f"{path}.{name}"
                else:
                    child = f"{path}.{name}" if path else name
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, value in enumerate(node.value):
                child = f"{path}[{index}]"
                lines[child] = value.start_mark.line + 1
                walk(value, child)

    if root is not None:
        walk(root, "")
    return lines
