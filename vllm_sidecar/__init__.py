"""One per vLLM pod: scrape, estimate residency, fetch/validate/load adapters, publish PodState."""
