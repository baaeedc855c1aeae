"""Training: the distributed steps and loop, its hooks, preemption, the cluster and the run directory."""
