"""Benchmarks behind `sslscale bench ...`: each prints a table and writes JSON."""
