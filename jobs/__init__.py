"""facelake's batch jobs and the `facelake` CLI. Jobs use facelake.index and facelake.cluster."""
