"""The simulated vLLM V1 engine: scheduler, KV cache, LoRA tiers and a simulated clock.

Event-driven: one timer per engine step, nothing runs while a pod is idle.

Step (``Engine._begin_step``), as vLLM's ``Scheduler.schedule`` with chunked prefill:

1. Token budget ``max_num_batched_tokens`` (default 8192). Running requests first, in admission
   order: each needs ``num_tokens - num_computed`` tokens (1 for a decode, the rest of the
   prompt for a partial prefill), capped by the remaining budget. New KV blocks come from the
   pool; when it is empty the *last* running request is preempted (recompute: blocks freed,
   computed tokens reset, back to the head of the waiting queue; ``num_preemptions``).
2. If nothing was preempted, waiting requests FCFS while budget and ``max_num_seqs`` allow.
   LoRA gate: a request whose adapter is not among the batch's adapters while the batch already
   holds ``max_loras`` distinct adapters is skipped (reason ``deferred``) and later requests may
   pass it. Otherwise its prefix-cache hit is looked up (full blocks, at most
   ``num_tokens - 1`` tokens, queries/hits counted in tokens) and blocks are allocated for the
   cached part plus the scheduled chunk; if the pool cannot supply them, scheduling of waiting
   requests stops (reason ``capacity``).
3. The batch's adapters are made resident (``lora_cache.LoraTiers.apply``): disk -> CPU and
   CPU -> GPU loads add their time to this step, which every request in the batch pays; so does
   the eager profile's one-off LoRA kernel compile on the engine's first step with an adapter.
4. Duration = ``CostProfile.step_time(prefill tokens, decoding seqs, their KV tokens, any
   adapter in the batch)`` + load stalls. At the end of the step every request whose computed
   tokens reach its token count samples one token (the first one ends its prefill: TTFT), full
   prompt blocks get their prefix hash, finished requests free their blocks.

Runtime ``add_lora`` calls (``/v1/load_lora_adapter``, the resolver) run between steps as their
own engine step of the load's duration (``CostProfile.load_api_s``), like vLLM's utility calls in
the engine-core loop: they load into the CPU cache and activate into a GPU slot, and every running
request waits.

Clock: simulated seconds. Wall time = simulated time x ``time_scale`` (0 = no delays at all:
steps follow each other as fast as the event loop allows and simulated time only advances by
steps). Each step ends exactly ``duration`` simulated seconds after it started, however late
the wall-clock timer fires, so CPU contention never changes simulated latencies. Step timers
are armed on the ideal wall timeline (start of the busy period + simulated time x scale), so
timer lateness up to ``MAX_DEBT_S`` is caught up by the following steps instead of stretching
wall time; beyond that the debt is dropped (wall time stretches). While idle, simulated time
follows the wall clock (divided by ``time_scale``); while busy ``now()`` never passes the end of
the step in flight. A request that arrives while a step's timer is late keeps its wall-clock
arrival (after that step's end) and is never scheduled into a step that began before it, so
its simulated TTFT never exceeds what its client measures (the catch-up shortens wall time).

Ground truth per request (``Request.record``), simulated seconds::

    queue_wait  = first scheduled step start - arrival (- the resolver's load, if any)
    adapter_load = load stalls of the steps the request was in before its first token
                   (+ the resolver's load when the request triggered it)
    prefill     = ttft - queue_wait - adapter_load
    ttft        = first token - arrival;   e2e = finish - arrival
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .costs import CostProfile, ideal_ttft
from .gpushare import SharedGpu
from .kvcache import BlockPool, block_hashes, chain_seed
from .lora_cache import LoraRef, LoraTiers
from .stats import EngineStats
from .textgen import TextGen
from .tokenizer import BYTES_PER_TOKEN

__all__ = ["CostProfile", "Engine", "EngineConfig", "LoraRef", "Request", "ideal_ttft"]

WAITING, RUNNING, FINISHED = 0, 1, 2
MAX_DEBT_S = 0.5  # wall seconds of timer lateness the engine catches up before it gives up


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits with vLLM's defaults for one H100 (``vllm serve``)."""

    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 1024
    block_size: int = 16
    num_gpu_blocks: int = 26592
    max_loras: int = 1
    max_cpu_loras: int = 1
    max_lora_rank: int = 16
    max_model_len: int = 131072
    time_scale: float = 1.0
    seed: int = 0
    ring_size: int = 5000
    lora_info_max_series: int = 256
    stream_interval: int = 1


class Request:
    """One request inside the engine (also its ground-truth record)."""

    __slots__ = (
        "request_id", "seq", "lora", "model_name", "prompt", "num_prompt", "hashes", "cached_upto",
        "max_tokens", "stop", "stop_hold", "gen", "num_output", "text", "emitted", "pieces",
        "num_computed", "blocks", "status", "deferred", "aborted", "arrival", "first_sched",
        "first_token", "last_token", "finish_time", "load_felt", "tier", "cached_tokens",
        "finish_reason", "stop_reason", "preemptions", "waiter", "resolved_load", "natural",
        "stream", "final_piece", "max_itl", "sink",
    )

    def __init__(self, request_id: str, lora: LoraRef | None, model_name: str, prompt: bytes,
                 num_prompt: int, max_tokens: int | None, stop: list[str], seed: int) -> None:
        self.request_id = request_id
        self.seq = 0
        self.lora = lora
        self.model_name = model_name
        self.prompt: bytes | None = prompt
        self.num_prompt = num_prompt
        self.hashes: list[int] = []
        self.cached_upto = 0
        self.stop = stop
        self.stop_hold = max((len(s) for s in stop), default=1) - 1
        self.gen = TextGen(seed, model_name, prompt)
        self.natural = max_tokens is None
        self.max_tokens = max_tokens if max_tokens is not None else self.gen.natural_len
        self.num_output = 0
        self.text = ""
        self.emitted = 0
        self.pieces: list[str] = []
        self.num_computed = 0
        self.blocks: list[int] = []
        self.status = WAITING
        self.deferred = False
        self.aborted = False
        self.arrival = 0.0
        self.first_sched: float | None = None
        self.first_token: float | None = None
        self.last_token = 0.0
        self.finish_time: float | None = None
        self.load_felt = 0.0
        self.resolved_load = 0.0
        self.tier = "base" if lora is None else "disk"
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self.preemptions = 0
        self.waiter: asyncio.Future[None] | None = None
        self.stream = False
        self.final_piece = ""
        self.max_itl = 0.0
        # streaming: called with the request after each non-final token (writes its chunks)
        self.sink: Callable[[Request], None] | None = None

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def take_pieces(self) -> list[str]:
        out, self.pieces = self.pieces, []
        return out

    def record(self) -> dict[str, Any]:
        ttft = None if self.first_token is None else self.first_token - self.arrival
        queue = None if self.first_sched is None else max(0.0, self.first_sched - self.arrival - self.resolved_load)
        load = self.load_felt + self.resolved_load
        prefill = None if ttft is None or queue is None else ttft - queue - load
        return {
            "seq": self.seq,
            "request_id": self.request_id,
            "adapter": None if self.lora is None else self.lora.name,
            "prompt_tokens": self.num_prompt,
            "cached_tokens": self.cached_tokens,
            "output_tokens": self.num_output,
            "arrival": self.arrival,
            "queue_wait": queue,
            "adapter_load": load if self.first_sched is not None else None,
            "prefill": prefill,
            "ttft": ttft,
            "e2e": None if self.finish_time is None else self.finish_time - self.arrival,
            "adapter_tier": self.tier if self.first_sched is not None or self.lora is None or self.resolved_load else None,
            "finish_reason": self.finish_reason,
            "preemptions": self.preemptions,
            "max_itl": self.max_itl,
        }


class Engine:
    """One simulated pod's engine. All methods run on the event loop's thread."""

    def __init__(self, config: EngineConfig, profile: CostProfile | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.profile = profile or CostProfile()
        self.loop = loop or asyncio.get_event_loop()
        self.wall_clock = wall_clock
        self.pool = BlockPool(config.num_gpu_blocks, config.block_size)
        self.loras = LoraTiers(config.max_loras, config.max_cpu_loras, self.profile)
        self.stats = EngineStats(config.max_model_len, config.lora_info_max_series)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.loading: list[str] = []
        self.num_deferred = 0
        self.ring: deque[Request] = deque(maxlen=config.ring_size)
        self._seq = 0
        self._inflight_loras: OrderedDict[str, int] = OrderedDict()
        self._lora_names = ""
        self._lora_names_dirty = False
        self._utilities: deque[tuple[Callable[[], float], asyncio.Future[float], str | None]] = deque()
        self._busy = False
        self._t = 0.0
        self._anchor = self.loop.time()
        self._step_end = 0.0
        self._step_start = 0.0
        self._scheduled: list[tuple[Request, int]] = []
        self._utility_future: asyncio.Future[float] | None = None
        self._utility_result = 0.0
        self._block_bytes = config.block_size * BYTES_PER_TOKEN
        self._jit_pending = self.profile.first_lora_jit_s > 0
        self.steps = 0
        self.gpu: SharedGpu | None = None   # set when pods share one GPU (``vllm_sim.gpushare``)

    def gpu_busy(self) -> bool:
        """Running requests or loading an adapter: using the GPU, as a neighbour sees it."""
        return bool(self.running) or self._utility_future is not None

    # -- clock ---------------------------------------------------------------------------------
    def now(self) -> float:
        """Current simulated time (never beyond the end of the step in flight)."""
        t = self.wall_now()
        return min(t, self._step_end) if self._busy else t

    def wall_now(self) -> float:
        """Simulated time by the wall clock: past the step in flight when its timer is late."""
        scale = self.config.time_scale
        if scale <= 0:
            return self._t
        return self._t + (self.loop.time() - self._anchor) / scale

    def _wall_delay(self, sim_seconds: float) -> float:
        return sim_seconds * self.config.time_scale

    # -- public API -------------------------------------------------------------------------------
    def add_request(self, req: Request, arrival: float | None = None) -> None:
        """Queue ``req``; ``arrival`` (simulated) defaults to now by the wall clock: a request that
        comes while a step's timer is late arrived after that step's end, and ``_schedule`` never
        puts it in a step that began before it."""
        req.arrival = self.wall_now() if arrival is None else arrival
        self._seq += 1
        req.seq = self._seq
        if req.lora is not None:
            req.hashes = block_hashes(req.prompt or b"", self._block_bytes,
                                      chain_seed(req.lora.name, req.lora.path), req.num_prompt // self.config.block_size)
            name = req.lora.name
            count = self._inflight_loras.get(name, 0)
            self._inflight_loras[name] = count + 1
            if not count:
                self._lora_names_dirty = True
        else:
            req.hashes = block_hashes(req.prompt or b"", self._block_bytes, chain_seed(None, None),
                                      req.num_prompt // self.config.block_size)
        self.waiting.append(req)
        self.ring.append(req)
        self._kick(req.arrival)

    def abort(self, req: Request) -> None:
        """Client went away: drop the request (finish reason ``abort``)."""
        if req.status == FINISHED or req.aborted:
            return
        req.aborted = True
        if req.status == WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
            self._finish(req, "abort", self.now())
        # running: removed at the end of the step in flight

    def run_utility(self, fn: Callable[[], float], loading: str | None = None) -> asyncio.Future[float]:
        """Run ``fn`` between steps; it returns the simulated seconds it takes (e.g. a load).

        ``loading`` names the adapter shown in ``state()["loading"]`` while it runs."""
        fut: asyncio.Future[float] = self.loop.create_future()
        self._utilities.append((fn, fut, loading))
        self._kick()
        return fut

    # -- loop ----------------------------------------------------------------------------------
    def _kick(self, start: float | None = None) -> None:
        """Wake an idle engine; its next step starts at ``start`` (default now, simulated)."""
        if not self._busy:
            now = self.now()
            self._t = now if start is None else max(self._t, min(start, now))
            self._anchor = self.loop.time() - (now - self._t) * max(self.config.time_scale, 0.0)
            self._busy = True
            self._step_end = self._t
            self.loop.call_soon(self._begin_step)

    def _arm(self, duration: float) -> None:
        self._step_start = self._t
        self._step_end = self._t + duration
        delay = self._wall_delay(duration)
        if delay > 0:
            self.loop.call_at(self._anchor + delay, self._end_step)
        else:
            self.loop.call_soon(self._end_step)

    def _begin_step(self) -> None:
        if self._utilities:
            fn, fut, label = self._utilities.popleft()
            self._utility_future = fut
            self.loading = [label] if label else []
            try:
                self._utility_result = float(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller
                self._utility_future = None
                if not fut.done():
                    fut.set_exception(e)
                self.loop.call_soon(self._begin_step)
                return
            if self.gpu is not None:
                self._utility_result *= self.gpu.factor(self, "load")
            self._scheduled = []
            for req in self.running:  # the engine loop is blocked: prefills in flight feel it
                if req.first_token is None:
                    req.load_felt += self._utility_result
            self._arm(self._utility_result)
            return
        if not self.running and not self.waiting:
            self._busy = False
            self.num_deferred = 0
            self._update_lora_info()
            return
        self._schedule()

    def _schedule(self) -> None:
        cfg = self.config
        pool = self.pool
        bs = cfg.block_size
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        batch_loras: dict[int, LoraRef] = {}
        running = self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.num_prompt + req.num_output - req.num_computed, budget)
            need = -(-(req.num_computed + n) // bs) - len(req.blocks)
            ok = True
            while need > 0:
                ids = pool.allocate(need)
                if ids is not None:
                    req.blocks.extend(ids)
                    break
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    ok = False
                    break
            if not ok:
                break
            scheduled.append((req, n))
            budget -= n
            if req.lora is not None:
                batch_loras[req.lora.lora_id] = req.lora
            i += 1
        deferred = 0
        if not preempted and self.waiting:
            remaining: list[Request] = []
            stop = False
            now = self._t
            max_loras = cfg.max_loras
            for req in self.waiting:
                if req.arrival > now:  # came while this step's start was overdue: the next step
                    remaining.append(req)
                    continue
                if stop or budget <= 0 or len(running) >= cfg.max_num_seqs:
                    stop = True
                    req.deferred = False
                    remaining.append(req)
                    continue
                lora = req.lora
                if lora is not None and lora.lora_id not in batch_loras and len(batch_loras) >= max_loras:
                    req.deferred = True
                    deferred += 1
                    remaining.append(req)
                    continue
                num_tokens = req.num_prompt + req.num_output
                max_hit = (num_tokens - 1) // bs
                hashes = req.hashes[:max_hit] if len(req.hashes) > max_hit else req.hashes
                hits = pool.count_hits(hashes)
                self.stats.prefix_queries += num_tokens
                self.stats.prefix_hits += hits * bs
                cached = hits * bs
                n = min(num_tokens - cached, budget)
                new_blocks = -(-(cached + n) // bs) - hits
                hit_hashes = hashes[:hits]
                evictable = pool.evictable_hits(hit_hashes)
                if new_blocks > pool.free_blocks - evictable:
                    stop = True
                    req.deferred = False
                    remaining.append(req)
                    continue
                req.blocks = pool.take_cached(hit_hashes) + (pool.allocate(new_blocks) or [])
                req.num_computed = cached
                req.cached_upto = hits
                req.deferred = False
                if req.first_sched is None:
                    req.first_sched = now
                    req.cached_tokens = cached
                    if lora is not None and not req.resolved_load:
                        req.tier = self.loras.tier(lora.lora_id)
                req.status = RUNNING
                running.append(req)
                scheduled.append((req, n))
                budget -= n
                if lora is not None:
                    batch_loras[lora.lora_id] = lora
            self.waiting = remaining
        self.num_deferred = deferred
        if not scheduled and not running and self.waiting:
            later = min((r.arrival for r in self.waiting if r.arrival > self._t), default=None)
            if later is not None:  # only requests that arrive later: idle until the first one
                self._scheduled = []
                self._arm(later - self._t)
                return
            # the head request cannot fit in the whole KV cache even alone: fail it, never spin
            self._finish(self.waiting.pop(0), "error", self._t)
            self.loop.call_soon(self._begin_step)
            return
        stall = 0.0
        self.loading = []
        if batch_loras:
            stall, self.loading = self.loras.apply(list(batch_loras.values()))
            if self._jit_pending:  # eager engine: the first LoRA step compiles the LoRA kernels
                self._jit_pending = False
                stall += self.profile.first_lora_jit_s
        prefill_tokens = decode_seqs = kv_tokens = 0
        for req, n in scheduled:
            if req.num_output > 0 and req.num_computed + n == req.num_prompt + req.num_output and n == 1:
                decode_seqs += 1
                kv_tokens += req.num_computed
            else:
                prefill_tokens += n
        step = self.profile.step_time(prefill_tokens, decode_seqs, kv_tokens, bool(batch_loras))
        if self.gpu is not None:  # other pods on this GPU are busy: this step time-slices with them
            step *= self.gpu.factor(self, self.gpu.share.step_kind(prefill_tokens))
            if batch_loras and self.loras.first_use(set(batch_loras)):
                step += self.gpu.first_use_s(self)
            if stall:
                stall *= self.gpu.factor(self, "load")
        if stall:
            for req, _n in scheduled:
                if req.first_token is None:
                    req.load_felt += stall
        self.stats.iteration_tokens.observe(float(prefill_tokens + decode_seqs))
        self._scheduled = scheduled
        self.steps += 1
        self._arm(step + stall)

    def _preempt(self, req: Request) -> None:
        self.pool.free(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.cached_upto = 0
        req.status = WAITING
        req.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.insert(0, req)

    def _end_step(self) -> None:
        self._t = self._step_end
        ideal = self._anchor + self._wall_delay(self._step_end - self._step_start)
        # Keep the wall timeline of the steps, not of the timers: a timer that fires late (timer
        # granularity, a busy loop) is caught up by the next steps instead of stretching wall
        # time. Beyond MAX_DEBT_S of lag (an overloaded process) the debt is dropped: wall time
        # stretches, simulated durations never do.
        self._anchor = ideal if self.loop.time() - ideal <= MAX_DEBT_S else self.loop.time()
        now = self._t
        if self._utility_future is not None:
            fut, self._utility_future = self._utility_future, None
            self.loading = []
            if not fut.done():
                fut.set_result(self._utility_result)
        pool = self.pool
        bs = self.config.block_size
        stats = self.stats
        stream_interval = self.config.stream_interval
        finished = False
        for req, n in self._scheduled:
            if req.status != RUNNING:
                continue
            if req.aborted:
                self._finish(req, "abort", now)
                finished = True
                continue
            req.num_computed += n
            if req.cached_upto < len(req.hashes):
                upto = min(req.num_computed // bs, len(req.hashes))
                if upto > req.cached_upto:
                    pool.cache_blocks(req.blocks, req.hashes, req.cached_upto, upto, req.prompt, req.lora)
                    req.cached_upto = upto
            if req.num_computed < req.num_prompt + req.num_output:
                continue
            req.num_output += 1
            stats.generation_tokens += 1
            if req.first_token is None:
                req.first_token = now
                stats.ttft.observe(now - req.arrival)
                stats.prompt_tokens += req.num_prompt
                stats.prompt_cached += req.cached_tokens
                stats.prompt_computed += req.num_prompt - req.cached_tokens
            else:
                gap = now - req.last_token
                stats.itl.observe(gap)
                if gap > req.max_itl:
                    req.max_itl = gap
            req.last_token = now
            reason = self._emit(req)
            if reason is not None:
                self._finish(req, reason, now)
                finished = True
            elif req.sink is not None and (req.num_output - 1) % stream_interval == 0:
                req.sink(req)
        if finished:
            self.running = [r for r in self.running if r.status == RUNNING]
        self._scheduled = []
        pool.flush_events()  # KV events of this step (stored, evicted), one batch when enabled
        self._update_lora_info()
        self._begin_step()

    def _emit(self, req: Request) -> str | None:
        """Add the sampled token's text; return a finish reason or None.

        Text of non-final tokens goes to ``req.pieces``; the final token's text to
        ``req.final_piece`` (vLLM sends it in the chunk that carries ``finish_reason``). With stop
        strings, up to ``len(longest stop) - 1`` characters are held back until they cannot start
        a match, and the text is cut before the stop string (not included in the output).
        """
        last = req.num_output >= req.max_tokens
        if last and req.natural:
            piece = ""  # EOS: counted as a token, no text
        else:
            piece = req.gen.next_piece()
        if not req.stop:
            if last:
                req.final_piece = piece
                return "stop" if req.natural else "length"
            req.pieces.append(piece)
            return None
        text = req.text + piece
        window_start = max(0, len(req.text) - req.stop_hold)
        for s in req.stop:
            idx = text.find(s, window_start)
            if idx >= 0:
                req.text = text[:idx]
                req.final_piece = req.text[req.emitted:]
                req.emitted = len(req.text)
                req.stop_reason = s
                return "stop"
        req.text = text
        if last:
            req.final_piece = text[req.emitted:]
            req.emitted = len(text)
            return "stop" if req.natural else "length"
        safe = len(text) - req.stop_hold
        if safe > req.emitted:
            req.pieces.append(text[req.emitted:safe])
            req.emitted = safe
        return None

    def _finish(self, req: Request, reason: str, now: float) -> None:
        if req.status == FINISHED:
            return
        if req.blocks:
            self.pool.free(req.blocks)
            req.blocks = []
        req.status = FINISHED
        req.finish_reason = reason
        req.finish_time = now
        req.prompt = None
        req.hashes = []
        if req.lora is not None:
            name = req.lora.name
            left = self._inflight_loras.get(name, 0) - 1
            if left > 0:
                self._inflight_loras[name] = left
            else:
                self._inflight_loras.pop(name, None)
                self._lora_names_dirty = True
        st = self.stats
        st.success[reason] = st.success.get(reason, 0) + 1
        st.e2e.observe(now - req.arrival)
        if req.first_sched is not None:
            st.queue.observe(req.first_sched - req.arrival)
            st.inference.observe(now - req.first_sched)
        if req.first_token is not None and req.first_sched is not None:
            st.prefill.observe(req.first_token - req.first_sched)
            st.decode.observe(now - req.first_token)
            if req.num_output > 1:
                st.tpot.observe((now - req.first_token) / (req.num_output - 1))
        st.req_prompt.observe(float(req.num_prompt))
        st.req_generation.observe(float(req.num_output))
        st.req_max_gen.observe(float(req.max_tokens))
        st.req_max_tokens.observe(float(req.max_tokens))
        st.req_n.observe(1.0)
        st.req_preemptions.observe(float(req.preemptions))
        st.req_kv_computed.observe(float(req.num_prompt - req.cached_tokens))
        if req.waiter is not None and not req.waiter.done():
            req.waiter.set_result(None)

    def _update_lora_info(self) -> None:
        if self._lora_names_dirty:
            self._lora_names = ",".join(self._inflight_loras)
            self._lora_names_dirty = False
        self.stats.set_lora_info(self._lora_names, self.wall_clock())

    # -- views -----------------------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        """Sequence number of the newest request."""
        return self._seq

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def state(self, since_seq: int = 0, limit: int | None = None) -> dict[str, Any]:
        """Ground truth (simulated seconds); requests with ``seq > since_seq``, oldest first."""
        if limit == 0:
            reqs: list[Request] = []
        else:
            reqs = [r for r in self.ring if r.seq > since_seq] if since_seq else list(self.ring)
            if limit is not None and len(reqs) > limit:
                reqs = reqs[:limit]
        name = {ref.lora_id: ref.name for ref in self.loras.cpu.values()}
        return {
            "now": self.now(),
            "gpu_adapters": [ref.name for ref in self.loras.gpu.values()],
            "cpu_adapters": [name[i] for i in self.loras.cpu],
            "loading": list(self.loading),
            "num_gpu_blocks": self.config.num_gpu_blocks,
            "free_blocks": self.pool.free_blocks,
            "cached_blocks": self.pool.cached_blocks,
            "running": len(self.running),
            "waiting": len(self.waiting),
            "deferred": self.num_deferred,
            "max_loras": self.config.max_loras,
            "max_cpu_loras": self.config.max_cpu_loras,
            "max_lora_rank": self.config.max_lora_rank,
            "block_size": self.config.block_size,
            "time_scale": self.config.time_scale,
            "steps": self.steps,
            "disk_loads": self.loras.loads_disk,
            "gpu_loads": self.loras.loads_gpu,
            "preemptions": self.stats.preemptions,
            "last_seq": self._seq,
            "requests": [r.record() for r in reqs],
        }
