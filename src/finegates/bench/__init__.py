"""Benchmarks inside the package: CPU latency, memory and size of a compressed model against its
dense counterpart (latency), and decoder generation speed (decoder)."""

from .latency import BenchConfig, bench, machine_info, make_inputs, print_table

__all__ = ["BenchConfig", "bench", "machine_info", "make_inputs", "print_table"]
