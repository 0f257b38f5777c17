"""Built-in plugins; importing this package registers every one of them by type name."""

from scorer.plugins import (  # noqa: F401
    adapter_residency,
    estimated_ttft,
    healthy_fresh,
    inflight,
    kv_usage,
    lora_affinity,
    lora_ready,
    max_score,
    placement_plan,
    precise_prefix,
    prefix_cache,
    queue,
    random_pick,
    recovery,
    rank_fits,
    round_robin,
    serves_base,
    session_affinity,
    weighted_random,
)
