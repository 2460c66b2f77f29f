"""What a search believes: its Optuna study and journal, the searcher, re-evaluation, the verdict on a trial."""
