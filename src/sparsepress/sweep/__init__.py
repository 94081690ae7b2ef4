"""Recipe sweeps: grid expansion, trials on Ray, a crash-proof results store and HTML / PNG reports.

`sparsepress sweep MODEL --grid GRID.yaml --out SWEEP` and `sparsepress report SWEEP_OR_DIR --out REPORT`
(DESIGN sections 2 and 3). Each name lives in one module of this package and is imported from there:
`grid` (what to try), `source` (the model and data shipped to workers once), `trial` (one trial's
work), `runners` (Ray or in-process), `store` (SQLite + results.csv), `driver` (the sweep loop),
`live` (the progress table), `breakdown` / `pareto` / `figures` / `page` (the report), `commands`
(the two CLI commands).

Example:
    >>> from sparsepress.sweep.grid import expand_grid
    >>> grid = {"recipe": {"stages": [{"quantize": {"method": "rtn"}}]}, "vary": {"stages.0.quantize.bits": [8, 4]}}
    >>> [t.label for t in expand_grid(grid).trials]
    ['bits=8', 'bits=4']
"""
