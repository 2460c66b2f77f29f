"""A search read back from its experiment: trials and their ranking, selection, report, export and plots."""
