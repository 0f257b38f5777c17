"""``/metrics`` in Prometheus text format, shaped like vLLM 0.33's ``PrometheusStatLogger``.

Same family names, types, HELP texts, label names (sorted, as ``prometheus_client`` prints them),
histogram buckets, ``_total`` counters with separate ``_created`` gauge families. Labels are
``engine="0"`` and ``model_name=<first served name>``; ``lora_requests_info`` has only
``max_lora``, ``running_lora_adapters``, ``waiting_lora_adapters`` (value: Unix time of the last
scheduler-stats update; one series per label combination, stale ones kept, bounded by
``lora_info_max_series``); ``cache_config_info`` carries vLLM's CacheConfig labels with this
pod's ``block_size`` and ``num_gpu_blocks``.

Opt-in (``--emit-residency-metrics``), the proposed upstream residency series::

    vllm:lora_adapter_loaded{adapter_name="sql-lora",level="gpu",rank="16"} 1.0

``level="gpu"`` for adapters in a GPU slot, ``level="cpu"`` for adapters only in the CPU cache
(each resident adapter appears once). Not emitted: python_*/process_* and http_* series.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.utils import floatToGoString

from .stats import FINISH_REASONS, Histogram

if TYPE_CHECKING:
    from .engine import Engine

_f = floatToGoString


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class MetricsRenderer:
    def __init__(self, engine: Engine, model_name: str, emit_residency: bool = False) -> None:
        self.engine = engine
        self.emit_residency = emit_residency
        self._cache: tuple[tuple[int, ...], str] | None = None
        self.base = f'engine="0",model_name="{_esc(model_name)}"'
        self.model_only = f'model_name="{_esc(model_name)}"'
        cfg = engine.config
        tokens = cfg.num_gpu_blocks * cfg.block_size
        self.cache_labels = (
            '_block_size_resolved="True",block_size="{bs}",cache_dtype="auto",cache_hit_alignment_tokens="None",'
            'effective_attention_block_size="None",enable_mamba_shared_prefix_checkpoint="False",'
            'enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.92",hash_block_size="None",'
            'is_attention_free="False",kv_cache_dtype_skip_layers="[]",kv_cache_layout="None",'
            'kv_cache_max_concurrency="{conc}",kv_cache_memory_bytes="None",kv_cache_size_tokens="{tokens}",'
            'kv_offloading_backend="native",kv_offloading_size="None",kv_sharing_fast_prefill="False",'
            'mamba_block_size="None",mamba_cache_dtype="auto",mamba_cache_mode="none",'
            'mamba_page_size_padded="None",mamba_ssm_cache_dtype="auto",num_cpu_blocks="None",'
            'num_gpu_blocks="{nb}",num_gpu_blocks_override="None",prefix_cache_retention_interval="0",'
            'prefix_caching_hash_algo="sha256",prefix_match_unit="None",replayssm_buffer_len="16",'
            'simple_cpu_offload_num_blocks="None",skip_page_size_padded="None",sliding_window="None",'
            'swa_bounded_replay="True",use_kda_recoverssm="False",use_replayssm="False",'
            'user_specified_block_size="False"'
        ).format(bs=cfg.block_size, nb=cfg.num_gpu_blocks, tokens=tokens,
                 conc=round(tokens / cfg.max_model_len, 2))

    # -- helpers -----------------------------------------------------------------------------------
    def _family(self, out: list[str], name: str, mtype: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}\n# TYPE {name} {mtype}\n")
        for labels, value in samples:
            out.append(f"{name}{{{labels}}} {_f(value)}\n")

    def _counter(self, out: list[str], name: str, help_: str, samples: list[tuple[str, float]], created: float) -> None:
        self._family(out, f"{name}_total", "counter", help_, samples)
        self._family(out, f"{name}_created", "gauge", help_, [(lbl, created) for lbl, _ in samples])

    def _hist(self, out: list[str], name: str, help_: str, h: Histogram) -> None:
        base = self.base
        out.append(f"# HELP {name} {help_}\n# TYPE {name} histogram\n")
        eng, model = base.split(",", 1)
        acc = 0
        for le, c in zip(h.buckets, h.counts):
            acc += c
            out.append(f'{name}_bucket{{{eng},le="{_f(le)}",{model}}} {_f(acc)}\n')
        out.append(f'{name}_bucket{{{eng},le="+Inf",{model}}} {_f(h.count)}\n')
        out.append(f"{name}_count{{{base}}} {_f(h.count)}\n{name}_sum{{{base}}} {_f(h.total)}\n")
        self._family(out, f"{name}_created", "gauge", help_, [(base, h.created)])

    # -- render ------------------------------------------------------------------------------------
    def render(self) -> str:
        """The exposition text; reused while the engine has not moved (frequent scrapers)."""
        e = self.engine
        key = (e.steps, e.last_seq, len(e.waiting), len(e.running), e.loras.loads_gpu, e.stats.success["abort"])
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        text = self._render()
        self._cache = (key, text)
        return text

    def _render(self) -> str:
        e = self.engine
        st = e.stats
        b = self.base
        c = st.created
        out: list[str] = []
        mfu = "(for Model Flops Utilization calculations)."
        self._counter(out, "vllm:estimated_flops_per_gpu", f"Estimated number of floating point operations per GPU {mfu}", [(b, 0.0)], c)
        self._counter(out, "vllm:estimated_read_bytes_per_gpu", f"Estimated number of bytes read from memory per GPU {mfu}", [(b, 0.0)], c)
        self._counter(out, "vllm:estimated_write_bytes_per_gpu", f"Estimated number of bytes written to memory per GPU {mfu}", [(b, 0.0)], c)
        waiting = e.num_waiting
        deferred = min(e.num_deferred, waiting)
        self._family(out, "vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", [(b, float(len(e.running)))])
        self._family(out, "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", [(b, float(waiting))])
        self._family(
            out, "vllm:num_requests_waiting_by_reason", "gauge",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; "
            "'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). "
            "Sum of all reasons equals vllm:num_requests_waiting.",
            [(b + ',reason="capacity"', float(waiting - deferred)), (b + ',reason="deferred"', float(deferred))],
        )
        self._family(
            out, "vllm:engine_sleep_state", "gauge",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
            "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            [(b + ',sleep_state="awake"', 1.0), (b + ',sleep_state="weights_offloaded"', 0.0),
             (b + ',sleep_state="discard_all"', 0.0)],
        )
        self._family(out, "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", [(b, e.pool.usage())])
        self._counter(out, "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", [(b, float(st.prefix_queries))], c)
        self._counter(out, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", [(b, float(st.prefix_hits))], c)
        self._counter(out, "vllm:external_prefix_cache_queries", "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.", [(b, 0.0)], c)
        self._counter(out, "vllm:external_prefix_cache_hits", "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.", [(b, 0.0)], c)
        self._counter(out, "vllm:mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items.", [(b, 0.0)], c)
        self._counter(out, "vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.", [(b, 0.0)], c)
        self._counter(out, "vllm:num_preemptions", "Cumulative number of preemption from the engine.", [(b, float(st.preemptions))], c)
        self._counter(out, "vllm:prompt_tokens", "Number of prefill tokens processed.", [(b, float(st.prompt_tokens))], c)
        self._counter(out, "vllm:prompt_tokens_by_source", "Number of prompt tokens by source.", [
            (b + ',source="local_compute"', float(st.prompt_computed)),
            (b + ',source="local_cache_hit"', float(st.prompt_cached)),
            (b + ',source="external_kv_transfer"', 0.0)], c)
        self._counter(out, "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).", [(b, float(st.prompt_cached))], c)
        self._counter(
            out, "vllm:prompt_tokens_cached_by_source",
            "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host (offloaded to DRAM), "
            "disk, p2p (transferred from another vLLM instance) or external_unspecified. Counted at admission; "
            "sums to vllm:prefix_cache_hits + vllm:external_prefix_cache_hits.",
            [(b + ',source="device"', float(st.prompt_cached)), (b + ',source="host"', 0.0), (b + ',source="p2p"', 0.0),
             (b + ',source="disk"', 0.0), (b + ',source="external_unspecified"', 0.0)], c)
        self._counter(out, "vllm:generation_tokens", "Number of generation tokens processed.", [(b, float(st.generation_tokens))], c)
        self._counter(out, "vllm:request_success", "Count of successfully processed requests.", [
            (b.replace(",model_name", f',finished_reason="{r}",model_name'), float(st.success.get(r, 0)))
            for r in FINISH_REASONS], c)
        m = self.model_only
        self._counter(out, "vllm:admission_rejections", "Number of admission attempts rejected by a queue limit, by reason.", [
            (m + ',reason="max_num_queued_reqs"', 0.0), (m + ',reason="max_num_queued_tokens"', 0.0)], c)
        self._hist(out, "vllm:request_prompt_tokens", "Number of prefill tokens processed.", st.req_prompt)
        self._hist(out, "vllm:request_generation_tokens", "Number of generation tokens processed.", st.req_generation)
        self._hist(out, "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", st.iteration_tokens)
        self._hist(out, "vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.", st.req_max_gen)
        self._hist(out, "vllm:request_params_n", "Histogram of the n request parameter.", st.req_n)
        self._hist(out, "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", st.req_max_tokens)
        self._hist(out, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", st.ttft)
        self._hist(out, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", st.itl)
        self._hist(out, "vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.", st.tpot)
        self._hist(out, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", st.e2e)
        self._hist(out, "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", st.queue)
        self._hist(out, "vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.", st.inference)
        self._hist(out, "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", st.prefill)
        self._hist(out, "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", st.decode)
        self._hist(out, "vllm:request_num_preemptions", "Histogram of the number of times a request was preempted.", st.req_preemptions)
        self._hist(out, "vllm:request_prefill_kv_computed_tokens", "Histogram of new KV tokens computed during prefill (excluding cached tokens).", st.req_kv_computed)
        max_lora = e.config.max_loras
        self._family(out, "vllm:lora_requests_info", "gauge", "Running stats on lora requests.", [
            (f'max_lora="{max_lora}",running_lora_adapters="{_esc(r)}",waiting_lora_adapters="{_esc(w)}"', ts)
            for (r, w), ts in st.lora_info.items()])
        self._family(out, "vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig", [(self.cache_labels, 1.0)])
        if self.emit_residency:
            gpu = e.loras.gpu
            samples = [(f'adapter_name="{_esc(ref.name)}",level="gpu",rank="{ref.rank}"', 1.0) for ref in gpu.values()]
            samples += [(f'adapter_name="{_esc(ref.name)}",level="cpu",rank="{ref.rank}"', 1.0)
                        for lid, ref in e.loras.cpu.items() if lid not in gpu]
            self._family(out, "vllm:lora_adapter_loaded", "gauge",
                         "LoRA adapters resident in GPU slots or only in the CPU cache (proposed upstream; simulator opt-in).",
                         samples)
        return "".join(out)
