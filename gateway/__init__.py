"""The HTTP edge: OpenAI routes, model-name parsing, allowlist, proxy, admin, metrics."""
