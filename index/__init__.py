"""FAISS: training, sharding, publishing versions, loading, searching, merging (no imports of facelake.jobs)."""
