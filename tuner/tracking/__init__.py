"""What a running search shows: each trial's W&B run, the search's W&B run, and the driver's log of trials."""
