"""What a search is: the space, its fidelity, the methods' costs, metric constraints, and the search record."""
