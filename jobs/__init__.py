"""Batch jobs over the fbmem tables, the config object, and the command-line entry point."""
