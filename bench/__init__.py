"""Workloads, the benchmark runner, reports and plots, and the Locust file."""
