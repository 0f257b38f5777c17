"""Built-in plugins; importing this package registers every one of them by type name."""

from scorer.plugins import (  # noqa: F401
    adapter_residency,
    estimated_ttft,
    healthy_fresh,
    inflight,
    kv_usage,
    lora_affinity,
    max_score,
    precise_prefix,
    prefix_cache,
    queue,
    random_pick,
    rank_fits,
    round_robin,
    serves_base,
    session_affinity,
    weighted_random,
)
