"""certtune's search service: thin adapters around Ray Tune, Optuna and W&B, and the CLI.

Its parts, each a package, imported in this order only (a part imports the ones before it, never after):
- `space`: what a search is: its space of configs, the fidelity a trial trains at, the methods' costs, the
  constraints on its metrics, and the record of all of it written before the search starts;
- `study`: what the search believes: the Optuna study and its journal, the searcher that asks Optuna and tells
  it, re-evaluation on seeds, and the one verdict on how a trial ended;
- `results`: reading an experiment back: trials, ranking, selection by a verifier, report, export, plots;
- `tracking`: what the search shows while it runs: each trial's W&B run, the search's W&B run, the log;
- `run`: running it: the driver on Ray Tune (start, resume, finish), the trainable, schedulers, budgets,
  the cluster connection.
Above them: `api` (the Python API), `commands` and `cli` (the command line). tests/test_layering.py holds the order.
"""
