# %% [markdown]
# # certtune from Python
# A tiny real search on MNIST, read back as a DataFrame, exported, and its best configuration retrained and
# verified: the same operations as `certtune search/report/export/train/verify`, with the same checks.
# Run it as a script (`python docs/api_example.py [WORK_DIR]`) or cell by cell (`# %%`) in a notebook.
# Data: $CERTTUNE_DATA, else ./data; MNIST is downloaded there on first use when missing.

# %%
import sys
from pathlib import Path

import certtune

work = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/api_example").resolve()
storage = work / "searches"

# %% [markdown]
# ## Search
# A shipped space by name (`mnist_tiny`), shrunk by overrides of its base config to seconds per trial: 4 epochs
# on 512 training images. A space can also be a YAML file or a dict with the same keys.

# %%
tiny = {"epochs": 4, "data.subset": 512, "data.val_size": 200, "data.test_subset": 200, "eps": 0.02}
found = certtune.search("mnist_tiny", tiny, name="api-example", num_samples=2, max_concurrent=2,
                        resources_per_trial={"cpu": 1}, scheduler="none", storage=storage, seed=0)
best = found.best()
print("best trial:", best.trial_id, best.params)

# %% [markdown]
# ## Report: one row per trial, the best first

# %%
table = certtune.report("api-example", storage=storage)
print(table[["trial_id", "status", "rank", "ibp_err", "clean_err"]].to_string(index=False))

# %% [markdown]
# ## Export, retrain the best configuration, verify its checkpoint

# %%
exported = certtune.export("api-example", storage=storage, out=work / "export")
metrics = certtune.train(exported["best_yaml"], out=work / "best-run")
print("retrained:", {k: metrics[k] for k in ("epoch", "clean_err", "ibp_err")})
errors = certtune.verify(work / "best-run" / "best.pt", methods=["ibp", "pgd"])
print("test errors:", errors)

# %% [markdown]
# Bad input raises `certtune.ConfigError` before anything runs; the CLI prints the same message as one line.

# %%
try:
    certtune.search("mnist_tiny", {"lr": 0.1}, storage=storage)
except certtune.ConfigError as e:
    print("refused:", e)
