"""certtune as a Python library: the CLI's operations as functions, with the CLI's checks and errors.

    import certtune
    found = certtune.search("mnist_tiny", {"data.subset": 1000}, name="demo", num_samples=4, data_dir="data")
    table = certtune.report("demo")              # pandas DataFrame, one row per trial
    certtune.export("demo", out="exports/demo")  # best.yaml, top_k/, trials.csv, plots
    certtune.train("exports/demo/best.yaml", data_dir="data", out="runs/best")
    certtune.verify("runs/best/best.pt", data_dir="data")

Bad input raises certtune.ConfigError (the CLI prints the same message as one line and exits 2). The
functions live in tuner/api.py; docs/api_example.py runs them end to end.
"""
from trainers.config import ConfigError, TrainConfig
from tuner.api import export, report, resume, search, train, verify

__all__ = ["search", "resume", "report", "export", "train", "verify", "ConfigError", "TrainConfig"]
