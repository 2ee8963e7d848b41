"""Fleets of virtual devices, healthy and attacked, for tests, demos and benchmarks."""
