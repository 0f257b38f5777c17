"""Composition root: the `loraroute` command, the demo, and helpers to run real processes."""
