"""Parts around the round that explain it: shadow (counterfactual) aggregation, client drift and
the speed of convergence."""
