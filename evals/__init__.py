"""evals: placeholder until its issue lands."""
