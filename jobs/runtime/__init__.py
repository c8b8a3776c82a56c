"""What every job runs inside: run records, the Ray session, the CPU allocator, the one stream writer."""
