"""Errors raised while building a pipeline from configuration."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid pipeline configuration.

    ``path`` names the offending key (e.g. ``pipeline.scorers[2].parameters.wieght``) and the
    message starts with it, so an operator sees at once which line of the YAML to fix.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.detail = message
        super().__init__(f"{path}: {message}")
