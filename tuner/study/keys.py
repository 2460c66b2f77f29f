"""Result keys a trial reports beyond the trainer's metrics, and the user attrs certtune puts on Optuna trials.

One place for these strings, so the trial, the searcher and the readers of a search agree without importing
each other. The metric names themselves (`epoch`, `epochs`, `ibp_err`, ...) are docs/method.md §5's vocabulary.
"""
DIVERGED = "diverged"  # result key: why a trial diverged (loss or bounds NaN/inf)
FAIL_REASON = "fail_reason"  # result key a trial may report, and the Optuna user attr of a FAIL trial
RAY_TRIAL_ID = "ray_trial_id"  # Optuna user attr linking each Optuna trial to its Ray trial
# A re-evaluation trial (tuner/study/reeval.py) trains an earlier trial's point with another seed. Both keys are in its
# Ray config (beside the sampled params, hence in params.json) and are user attrs of its Optuna trial; every
# Optuna trial of a search with re-evaluation carries them, the original with its own Ray id and offset 0.
CONFIG_OF = "config_of"  # the Ray trial id of the trial that first trained this point
SEED_OFFSET = "seed_offset"  # added to the config's seed
# In a stopped trial's directory: the rule that stopped it, one of STOP_REASONS (written by tuner/run/schedulers.py;
# what each means, and a trial without one: tuner/results/experiment.py Search.stop_rule).
STOP_REASON_FILE = "certtune_stop_reason.json"
STOP_REASONS = ("rung", "share")
