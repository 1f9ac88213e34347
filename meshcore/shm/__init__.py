"""Shared memory between the supervisor and the workers: byte layout, atomics, segment."""
