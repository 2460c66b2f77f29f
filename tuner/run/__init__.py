"""Running a search on Ray Tune: the driver (start, resume, finish), the trainable, schedulers, budgets, cluster."""
