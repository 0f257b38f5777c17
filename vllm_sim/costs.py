"""Cost model of one engine step, for an 8B model on one H100 80GB (bf16, vLLM with CUDA graphs).

Step duration (simulated seconds)::

    step = step_overhead_s
         + prefill_token_s   * (uncached prompt tokens computed in the step)
         + decode_seq_s      * (sequences decoding one token in the step)
         + decode_kv_token_s * (KV tokens those decoding sequences attend to)
         + load stalls of the step (below)

Adapter loads stall the whole step (vLLM loads synchronously inside ``set_active_adapters``, so
every request in the batch waits; reference section 8)::

    load stall = sum over adapters of the batch missing from the CPU cache of disk_load_s(rank)
               + sum over adapters of the batch missing from the GPU slots of cpu_to_gpu_s

Defaults and where they come from (docs: shared reference ``h100-calibration.md`` = CAL,
``vllm-lora-surface.md`` section 8 = REF):

- ``step_overhead_s = 0.008``: one decode step must read the 16 GB of weights; CAL measures a
  bandwidth floor of ~5.4 ms at batch 1 and says vLLM with CUDA graphs lands within ~1.5x of it.
- ``decode_kv_token_s = 6.5e-8``: an 8B model with 8 KV heads keeps 128 KiB of KV per token;
  128 KiB / 3 TB/s (CAL's measured bandwidth) x 1.5 (same vLLM factor). Reproduces CAL's floor
  growth from 5.4 ms (batch 1) to 11 ms (batch 128 at context 1024), times 1.5.
- ``decode_seq_s = 2e-5``: per-sequence sampling and bookkeeping (small; keeps large batches of
  short contexts from being free).
- ``prefill_token_s = 3.1e-5``: CAL's compute-bound prefill slope, 0.031 ms/token from 2k to 8k
  tokens (~32k tokens/s). vLLM sheds the eager launch overhead, not the slope.
- ``disk_load_points``: REF's cold disk->CPU loads for Llama-2-7B, 104 / 263 / 510 ms at rank
  8 / 16 / 32 (BSC measurements), extrapolated linearly to rank 64 (~1.0 s), scaled by
  ``model_scale = 1.05`` for Llama-3.1-8B (same 224 target modules; 1.05x the LoRA parameters
  on all seven projections). Linear interpolation between points, linear extrapolation outside.
  The page cache is not modelled: every CPU-cache miss costs the cold figure.
- ``cpu_to_gpu_s = 0.009``: REF's 8.5-9.3 ms activation copy, flat in rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CostProfile:
    """Per-step costs in simulated seconds (see the module docstring for formula and sources)."""

    step_overhead_s: float = 0.008
    prefill_token_s: float = 3.1e-5
    decode_seq_s: float = 2e-5
    decode_kv_token_s: float = 6.5e-8
    # (rank, seconds) for a 7B model, cold disk -> CPU
    disk_load_points: tuple[tuple[int, float], ...] = field(
        default=((8, 0.104), (16, 0.263), (32, 0.510), (64, 0.995))
    )
    model_scale: float = 1.05
    cpu_to_gpu_s: float = 0.009

    def disk_load_s(self, rank: int) -> float:
        """Cold disk -> CPU load of an adapter of ``rank`` (interpolated, scaled by model_scale)."""
        pts = sorted(self.disk_load_points)
        if len(pts) == 1:
            return pts[0][1] * self.model_scale
        if rank <= pts[0][0]:
            (r0, t0), (r1, t1) = pts[0], pts[1]
        elif rank >= pts[-1][0]:
            (r0, t0), (r1, t1) = pts[-2], pts[-1]
        else:
            i = next(k for k in range(1, len(pts)) if pts[k][0] >= rank)
            (r0, t0), (r1, t1) = pts[i - 1], pts[i]
        t = t0 + (t1 - t0) * (rank - r0) / (r1 - r0)
        return max(t, self.cpu_to_gpu_s) * self.model_scale

    def step_time(self, prefill_tokens: int, decode_seqs: int, decode_kv_tokens: int) -> float:
        """Duration of a step without load stalls."""
        return (
            self.step_overhead_s
            + self.prefill_token_s * prefill_tokens
            + self.decode_seq_s * decode_seqs
            + self.decode_kv_token_s * decode_kv_tokens
        )


def ideal_ttft(
    profile: CostProfile, prompt_tokens: int, cached_tokens: int, max_num_batched_tokens: int = 8192
) -> float:
    """TTFT of a request alone on an idle pod with its adapter resident (simulated seconds).

    The uncached part is prefilled in chunks of ``max_num_batched_tokens``; the first token comes
    at the end of the last chunk's step::

        uncached = prompt_tokens - min(cached_tokens, prompt_tokens - 1)
        ttft = ceil(uncached / max_num_batched_tokens) * step_overhead_s + uncached * prefill_token_s

    (vLLM always recomputes at least the last prompt token, hence ``prompt_tokens - 1``.)
    """
    prompt_tokens = max(1, int(prompt_tokens))
    cached = max(0, min(int(cached_tokens), prompt_tokens - 1))
    uncached = prompt_tokens - cached
    steps = -(-uncached // max_num_batched_tokens)
    return steps * profile.step_overhead_s + uncached * profile.prefill_token_s
