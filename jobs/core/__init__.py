"""The pure method: plain functions over tensors and arrays (no Ray, LanceDB, DuckDB, storage or pipelines)."""
