"""The LanceDB database: table schemas, connection, idempotent writes, DuckDB views."""
