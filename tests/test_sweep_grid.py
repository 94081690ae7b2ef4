"""Sweep grids: expansion order, unions of blocks, deduplication, budgets varied like any path, and
validation errors that name the bad dotted path."""

from __future__ import annotations

import pytest

from sparsepress.errors import GridError, InputError
from sparsepress.sweep.grid import expand_grid, load_grid, set_path, short_names

BASE = {
    "stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}, {"quantize": {"method": "rtn", "bits": 8}}],
    "format": "auto",
}


def _grid(vary, **extra):
    return expand_grid({"recipe": BASE, "vary": vary, **extra})


def test_every_combination_is_one_trial_in_product_order():
    grid = _grid(
        {"stages.0.prune.method": ["magnitude", "wanda", "sparsegpt"], "stages.0.prune.sparsity": [0.5, 0.7]}
    )
    assert grid.combinations == 6 and len(grid.trials) == 6
    assert [(t.recipe.prune.method, t.recipe.prune.sparsity) for t in grid.trials] == [
        ("magnitude", 0.5),
        ("magnitude", 0.7),
        ("wanda", 0.5),
        ("wanda", 0.7),
        ("sparsegpt", 0.5),
        ("sparsegpt", 0.7),
    ]
    assert [t.index for t in grid.trials] == list(range(6))
    assert len({t.key for t in grid.trials}) == 6
    # The base recipe is untouched by expansion: every trial keeps its quantize stage.
    assert all(t.recipe.quantize.bits == 8 for t in grid.trials)


def test_a_list_of_blocks_joins_their_products_and_drops_repeats():
    grid = _grid(
        [
            {"stages.0.prune.sparsity": [0.5, 0.7]},
            {"stages.0.prune.pattern": ["2:4"], "stages.0.prune.sparsity": [None]},
            {"stages.0.prune.sparsity": [0.5]},
        ]
    )  # the same recipe as the first trial
    assert grid.combinations == 4
    assert [str(t.recipe.prune.parsed_pattern) for t in grid.trials] == [
        "unstructured",
        "unstructured",
        "2:4",
    ]


def test_budget_targets_and_top_level_keys_vary_like_any_path():
    budgeted = {**BASE, "stages": [{"prune": {"method": "wanda"}}, BASE["stages"][1]], "budget": {"size_mb": 20}}
    grid = expand_grid({"recipe": budgeted, "vary": {"budget.size_mb": [8, 12], "format": ["bitmask", "csr"],
                                                     "solver.mask_search": [0]}})
    assert [(t.recipe.budget.size_mb, t.recipe.format) for t in grid.trials] == [
        (8.0, "bitmask"),
        (8.0, "csr"),
        (12.0, "bitmask"),
        (12.0, "csr"),
    ]
    assert all(t.recipe.solver.mask_search == 0 for t in grid.trials)


def test_labels_name_each_varied_value_unambiguously():
    grid = _grid(
        {
            "stages.0.prune.method": ["wanda"],
            "stages.1.quantize.method": ["gptq"],
            "stages.1.quantize.bits": [4],
        }
    )
    assert grid.trials[0].label == "prune.method=wanda quantize.method=gptq bits=4"
    assert short_names(["a.b.c", "x.b.c", "d"]) == {"a.b.c": "a.b.c", "x.b.c": "x.b.c", "d": "d"}


def test_no_vary_is_the_base_recipe_alone():
    grid = expand_grid({"recipe": BASE})
    assert len(grid.trials) == 1 and grid.trials[0].label == "base recipe"


@pytest.mark.parametrize(
    "vary, path, words",
    [
        ({"stages.0.prune.sparsty": [0.5]}, "vary.stages.0.prune.sparsty", "known keys"),
        ({"stages.0.prune.sparsity": [0.5, 1.5]}, "vary.stages.0.prune.sparsity", "1.5"),
        ({"stages.0.prune.method": ["lottery"]}, "vary.stages.0.prune.method", "sparsegpt"),
        ({"stages.1.prune.sparsity": [0.5]}, "vary.stages.1.prune.sparsity", "'quantize' stage"),
        ({"stages.7.prune.sparsity": [0.5]}, "vary.stages.7.prune.sparsity", "out of range"),
        ({"stages.x.prune.sparsity": [0.5]}, "vary.stages.x.prune.sparsity", "index it with a number"),
        ({"stages.0.prune.method.kind": [1]}, "vary.stages.0.prune.method.kind", "not a mapping"),
        ({"budget.size_mb": [-1]}, "vary.budget.size_mb", "greater than 0"),
        ({"stages.0.prune.sparsity": 0.5}, "vary.stages.0.prune.sparsity", "non-empty list"),
        ({"stages.0.prune.sparsity": []}, "vary.stages.0.prune.sparsity", "non-empty list"),
    ],
)
def test_validation_errors_name_the_bad_dotted_path(vary, path, words):
    with pytest.raises(GridError) as caught:
        _grid(vary)
    assert caught.value.path == path and words in str(caught.value)


def test_a_combination_error_names_the_path_and_the_values_beside_it():
    with pytest.raises(GridError) as caught:
        _grid({"stages.0.prune.pattern": ["2:4"], "stages.0.prune.sparsity": [0.5, 0.7]})
    assert caught.value.path == "vary.stages.0.prune.sparsity"
    assert "0.7" in str(caught.value) and "stages.0.prune.pattern=2:4" in str(caught.value)


@pytest.mark.parametrize(
    "grid, path",
    [
        ({"recipe": BASE, "vary": {}, "trials": 3}, "trials"),
        ({"vary": {}}, "recipe"),
        ({"recipe": {"stages": [{"prune": {"method": "wanda"}}]}}, "recipe.stages.0.prune.sparsity"),
        ({"recipe": BASE, "vary": "stages.0.prune.method"}, "vary"),
        ({"recipe": BASE, "settings": {"samples": 0}}, "settings.samples"),
        ({"recipe": BASE, "settings": {"colour": "red"}}, "settings.colour"),
        ({"recipe": BASE, "settings": {"user_metric": "no_such_module_xyz:f"}}, "settings.user_metric"),
        ({"recipe": BASE, "settings": {"user_metric": "math"}}, "settings.user_metric"),
    ],
)
def test_top_level_and_settings_errors_name_their_key(grid, path):
    with pytest.raises(GridError) as caught:
        expand_grid(grid)
    assert caught.value.path == path


def test_set_path_creates_missing_mappings_but_never_new_stages():
    recipe = {"stages": [{"prune": {}}]}
    set_path(recipe, "solver.mask_search", 0)
    assert recipe["solver"] == {"mask_search": 0}
    with pytest.raises(GridError, match="'prune' stage, not 'quantize'"):
        set_path(recipe, "stages.0.quantize.bits", 4)


def test_grid_files_are_read_with_errors_naming_the_file(tmp_path):
    with pytest.raises(InputError, match="grid file not found"):
        load_grid(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: [unclosed\n")
    with pytest.raises(InputError, match="bad.yaml"):
        load_grid(bad)
    good = tmp_path / "good.yaml"
    good.write_text(
        "recipe: {stages: [{quantize: {method: rtn}}]}\nvary: {stages.0.quantize.bits: [8, 4]}\n"
        "settings: {samples: 8, latency: null}\n"
    )
    grid = load_grid(good)
    assert len(grid.trials) == 2 and grid.settings.samples == 8 and grid.settings.latency is None
