"""Result keys a trial reports beyond the trainer's metrics, and the user attrs certtune puts on Optuna trials.

One place for these strings, so the trial, the searcher and the readers of a search agree without importing
each other. The metric names themselves (`epoch`, `epochs`, `ibp_err`, ...) are design.md's vocabulary.
"""
DIVERGED = "diverged"  # result key: why a trial diverged (loss or bounds NaN/inf)
FAIL_REASON = "fail_reason"  # result key a trial may report, and the Optuna user attr of a FAIL trial
RAY_TRIAL_ID = "ray_trial_id"  # Optuna user attr linking each Optuna trial to its Ray trial
