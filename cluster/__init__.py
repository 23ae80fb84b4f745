"""Ray runtime for facelake: local default vs an existing cluster, resources, schedule files."""
