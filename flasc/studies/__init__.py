"""Studies of many runs: what a run is, the cluster launchers (SLURM, Ray) and the study tables."""
