"""A simulator of a vLLM 0.33 OpenAI server with multi-LoRA, for tests, benchmarks and the demo."""
