"""The vLLM-style continuous-batching scheduler of one engine, on the analytic performance model.

Both simulators drive this one scheduler: ``batching.simulate`` replays a list of calls known in
advance (profiles, static batches), the workflow simulator (``services.core.sim``) hands calls to
each replica as its programs reach them. Each iteration's duration comes from ``PerfModel``. The
scheduler mirrors vLLM's:

- at most ``max_num_seqs`` sequences run at once; an iteration computes at most
  ``max_batched_tokens`` tokens;
- with ``chunked_prefill`` (vLLM V1, the default) running sequences decode first and prompts fill
  the rest of the token budget, a long prompt in chunks over several iterations; without it
  (vLLM V0) an iteration either prefills whole prompts or decodes every running sequence, and
  prefills go first;
- a waiting call is admitted (first come, first served) only when its whole prompt fits in the
  free KV cache minus a small watermark; when decoding sequences outgrow the cache, the most
  recently admitted sequence is preempted and later recomputed (its prompt plus the tokens it had
  generated are prefilled again), as vLLM's recompute preemption does.

KV usage is counted in tokens (vLLM's 16-token blocks waste at most a block per sequence).

``BatchEngine`` is driven by events:

- ``submit(now, prompt, completion)`` hands a call to the engine at time ``now``;
- ``wake`` is when the iteration in progress ends (``None`` while idle); ``epoch`` changes whenever
  ``wake`` does, so an event loop can drop the stale wake-up events it scheduled before;
- at ``wake`` the loop calls ``finish_iteration(now)`` (the calls finished at ``now``), hands the
  results on (new calls may be submitted at ``now``: they join the next iteration, as in vLLM)
  and then ``start_iteration(now)``.

Iterations that change the batch (prefill chunks, admissions, preemptions) are computed one at a
time. A run of pure decode iterations over an unchanged batch is one event, up to the next finish
or the point where the KV cache fills; its iteration times are affine in the context
(``PerfModel.decode_times``), so the run's end and the iteration in progress at any instant have a
closed form, which keeps a profile's worth of simulation fast. A call submitted during such a
run, that could be admitted at once, cuts the run short at the end of the iteration in progress.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections import deque
from dataclasses import dataclass

from services.core.errors import InvalidInputError
from services.core.perf.model import DEFAULT_MEMORY_UTILIZATION, PerfModel, StepLoad


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Engine scheduling limits (vLLM flag names in comments)."""

    max_num_seqs: int = 256  # --max-num-seqs
    max_batched_tokens: int = 8192  # --max-num-batched-tokens
    chunked_prefill: bool = True  # --enable-chunked-prefill (always on in vLLM V1)
    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION  # --gpu-memory-utilization
    watermark: float = 0.01  # share of the KV cache kept free when admitting a prompt

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise InvalidInputError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_batched_tokens < 1:
            raise InvalidInputError(
                f"max_batched_tokens: must be >= 1, got {self.max_batched_tokens}"
            )
        if not 0 <= self.watermark < 1:
            raise InvalidInputError(f"watermark: must be in [0, 1), got {self.watermark}")


_StepKey = tuple[int, float, int, int]  # StepLoad's fields but the decode context, in order
# Decode-run coefficients and iteration times less their decode attention (``step_fixed``), by
# performance model (both pure functions of the model and the load), shared by the engines of
# one model: a profile runs several simulations of the same instance. Keyed by
# the model object's id; the entry holds the object, so the id cannot be reused while it lives.
_MEMO: dict[int, tuple[PerfModel, dict[int, tuple[float, float]], dict[_StepKey, float]]] = {}
_MEMO_MODELS = 16  # models remembered (all dropped beyond)
_MEMO_STEPS = 20_000  # iteration times remembered per model (all dropped beyond)


def _memo(perf: PerfModel) -> tuple[dict[int, tuple[float, float]], dict[_StepKey, float]]:
    """The decode-run coefficients and iteration times remembered for ``perf``."""
    found = _MEMO.get(id(perf))
    if found is None or found[0] is not perf:
        if len(_MEMO) >= _MEMO_MODELS:
            _MEMO.clear()
        found = _MEMO[id(perf)] = (perf, {}, {})
    elif len(found[2]) > _MEMO_STEPS:
        found[2].clear()
    return found[1], found[2]


class BatchEngine:
    """Mutable scheduler state of one engine instance (see the module docstring).

    Calls are numbered 0, 1, ... in submission order; ``first_token[i]`` and ``finish[i]`` hold
    their times once known (NaN before). ``kv_capacity`` (tokens) overrides the perf model's.
    Raises ``InvalidInputError`` from ``submit`` for a call that can never fit the KV cache (or,
    without chunked prefill, the token budget); the constructor raises ``InfeasibleError`` when
    the model does not fit in memory.
    """

    def __init__(
        self, perf: PerfModel, config: SchedulerConfig | None = None, kv_capacity: int | None = None
    ) -> None:
        self.perf = perf
        self.cfg = config or SchedulerConfig()
        self.capacity = kv_capacity or perf.kv_capacity_tokens(
            self.cfg.memory_utilization, self.cfg.max_batched_tokens
        )
        self.watermark = int(self.cfg.watermark * self.capacity)
        self.prompt: list[int] = []
        self.out: list[int] = []
        self.first_token: list[float] = []
        self.finish: list[float] = []
        self.gen: list[int] = []  # tokens generated so far (valid while not decoding)
        self.need: list[int] = []  # tokens the current admission must prefill
        self.prog: list[int] = []  # of which computed
        self.fin_at: list[int] = []  # decode counter value at which a decoding call finishes
        self.clock = 0.0  # end of the last committed iteration
        self.decode_counter = 0
        self.waiting: deque[int] = deque()
        self.running: dict[int, None] = {}  # admission order; popitem() gives the newest
        self.prefilling: dict[int, None] = {}
        self.heap: list[tuple[int, int]] = []  # (fin_at, call) of decoding calls
        self.decoding: set[int] = set()
        self.kv_used = 0
        self.dec_context = 0
        self.preemptions = 0
        self.iterations = 0
        self.wake: float | None = None
        self.epoch = 0
        self._done: list[int] = []  # calls finishing at ``wake``
        self._run: tuple[float, int, float, float] | None = None  # lazy decode run
        self._run_cuttable = False
        self._coef, self._steps = _memo(perf)
        self._context_s = perf.context_seconds
        self._max_seqs = self.cfg.max_num_seqs
        self._token_budget = self.cfg.max_batched_tokens
        self._chunked = self.cfg.chunked_prefill

    @property
    def outstanding(self) -> int:
        """Calls submitted and not finished (waiting, running or finishing at ``wake``)."""
        return len(self.waiting) + len(self.running) + len(self._done)

    # --- the event interface -----------------------------------------------------------------
    # The hot paths (``submit``, ``_chunked_step``, runs and finishes) read the engine's state
    # into locals and inline small helpers: a profile runs hundreds of thousands of iterations.

    def submit(self, now: float, prompt: int, completion: int, start: bool = True) -> int:
        """Hand a call to the engine at ``now``; returns its number. May change ``wake``.

        An idle engine starts an iteration at once, unless ``start`` is False (the caller will
        call ``start_iteration(now)`` after handing over every call of this instant)."""
        self._check(prompt, completion)
        i = len(self.prompt)
        self.prompt.append(prompt)
        self.out.append(completion)
        self.gen.append(0)
        self.need.append(0)
        self.prog.append(0)
        self.fin_at.append(0)
        self.first_token.append(math.nan)
        self.finish.append(math.nan)
        waiting = self.waiting
        was_empty = not waiting
        waiting.append(i)
        if self.wake is None:
            if start:
                self.start_iteration(now)
        elif was_empty and self._run_cuttable and self._run is not None:
            self._cut_run(now)
        return i

    def replay(
        self,
        arrival: list[float],
        prompt: list[int],
        completion: list[int],
        stop_after: int | None = None,
    ) -> int:
        """Submit calls at their (non-decreasing) arrival times and run until idle, or, after the
        last arrival, until ``stop_after`` calls have finished; returns the calls finished.

        The same as ``submit(t, ..., start=False)`` for each call arriving at ``t``, then
        ``start_iteration(t)``, with every iteration ending at or before ``t`` finished (and the
        next started) first: calls arriving together join the same iteration. Faster: the
        calls are checked and registered at once."""
        n = len(arrival)
        if n and (
            min(prompt) < 1
            or min(completion) < 1
            or max(map(operator.add, prompt, completion)) + self.watermark > self.capacity
            or not self._chunked
        ):
            for p, c in zip(prompt, completion, strict=True):
                self._check(p, c)
        first = len(self.prompt)
        self.prompt.extend(prompt)
        self.out.extend(completion)
        zeros = [0] * n
        for column in (self.gen, self.need, self.prog, self.fin_at):
            column.extend(zeros)
        nans = [math.nan] * n
        self.first_token.extend(nans)
        self.finish.extend(nans)
        step = self._chunked_step if self._chunked else self._v0_step
        waiting, running, done = self.waiting, self.running, self._done
        goal = n if stop_after is None else stop_after
        finished = 0
        i = 0
        now = self.wake
        while True:
            t = arrival[i] if i < n else math.inf
            if now is not None and now < t:
                if i >= n and finished >= goal:
                    break
                # the iteration (or decode run) ending at ``now``, before the next arrival:
                # ``finish_iteration(now)`` then ``start_iteration(now)``, inlined
                run = self._run
                if run is not None:  # ``_commit_run(run[1])``
                    start, steps, first_s, slope = run
                    n_dec = len(self.decoding)
                    self.clock = start + steps * first_s + slope * (steps - 1) * steps / 2
                    self._run = None
                    self.iterations += steps
                    counter = self.decode_counter + steps
                    self.decode_counter = counter
                    self.kv_used += n_dec * steps
                    self.dec_context += n_dec * steps
                    if self.heap[0][0] <= counter:  # a run has decoding calls in the heap
                        self._pop_finished()
                # (the clock is at ``now``: what ends there was just committed)
                if done:
                    finished += len(done)
                    done.clear()
                self.wake = None
                if running or waiting:
                    step()
                self.epoch += 1
                now = self.wake
                continue
            if i >= n:
                break  # idle after the last arrival
            if now is not None and now == t:
                finished += len(self.finish_iteration(now))
                now = None
            was_empty = not waiting
            while i < n and arrival[i] == t:
                waiting.append(first + i)
                i += 1
            if now is None:
                self.start_iteration(t)
            elif was_empty and self._run_cuttable and self._run is not None:
                self._cut_run(t)
            now = self.wake
        return finished

    def _check(self, prompt: int, completion: int) -> None:
        """Raise ``InvalidInputError`` for a call this engine can never run."""
        if prompt < 1 or completion < 1:
            raise InvalidInputError(
                f"engine: prompt and completion must be >= 1 token, got {prompt}, {completion}"
            )
        if prompt + completion + self.watermark > self.capacity:
            raise InvalidInputError(
                f"engine {self.perf.model.name}: a call of {prompt + completion} tokens exceeds "
                f"the KV cache ({self.capacity} tokens)"
            )
        if not self._chunked and prompt + completion > self._token_budget:
            raise InvalidInputError(
                f"engine: without chunked prefill a call must fit max_batched_tokens "
                f"({self._token_budget}), got {prompt + completion} tokens"
            )

    def finish_iteration(self, now: float) -> list[int]:
        """Commit the iteration ending at ``now`` (= ``wake``); the calls it finished."""
        if self.wake is None or now != self.wake:
            raise InvalidInputError(f"engine: no iteration ends at {now} (wake {self.wake})")
        if self._run is not None:
            self._commit_run(self._run[1])
        done, self._done = self._done, []
        self.wake = None
        return done

    def start_iteration(self, now: float) -> None:
        """Begin the next iteration at ``now`` if there is work and none is in progress (a call
        submitted to an idle engine starts one itself); sets ``wake`` (None: idle)."""
        if self.wake is not None:
            return
        self.clock = max(self.clock, now)
        if self.running or self.waiting:
            if self._chunked:
                self._chunked_step()
            else:
                self._v0_step()
        self.epoch += 1

    # --- bookkeeping -------------------------------------------------------------------------

    def _generated(self, i: int) -> int:
        return self.out[i] - (self.fin_at[i] - self.decode_counter)

    def _admit(self, i: int) -> None:
        self.waiting.popleft()
        self.need[i] = self.prompt[i] + self.gen[i]
        self.prog[i] = 0
        self.kv_used += self.need[i]
        self.running[i] = None
        self.prefilling[i] = None

    def _start_decoding(self, i: int) -> None:
        """Prefill of ``i`` finished at ``self.clock``: it emitted one token."""
        del self.prefilling[i]
        gen = self.gen[i] + 1
        self.gen[i] = gen
        if math.isnan(self.first_token[i]):
            self.first_token[i] = self.clock
        left = self.out[i] - gen
        if left <= 0:
            self._finish(i, self.need[i])
            return
        fin = self.decode_counter + left
        self.fin_at[i] = fin
        heapq.heappush(self.heap, (fin, i))
        self.decoding.add(i)
        self.dec_context += self.need[i]

    def _finish(self, i: int, kv_tokens: int) -> None:
        self.finish[i] = self.clock
        del self.running[i]
        self.kv_used -= kv_tokens
        self._done.append(i)

    def _preempt_newest(self) -> None:
        i, _ = self.running.popitem()
        self.preemptions += 1
        if i in self.decoding:
            self.decoding.discard(i)
            self.gen[i] = self._generated(i)
            kv = self.prompt[i] + self.gen[i] - 1
            self.dec_context -= kv
            self.kv_used -= kv
        else:
            del self.prefilling[i]
            self.kv_used -= self.need[i]
        self.waiting.appendleft(i)

    def _pop_finished(self) -> None:
        heap = self.heap
        counter = self.decode_counter
        if not heap or heap[0][0] > counter:
            return
        decoding, fin_at, prompt, out = self.decoding, self.fin_at, self.prompt, self.out
        finish, running, done, clock = self.finish, self.running, self._done, self.clock
        gen, pop = self.gen, heapq.heappop
        freed = 0  # KV tokens of the finished calls (all were decoding: they leave the context)
        while heap and heap[0][0] <= counter:
            fin, i = pop(heap)
            if i not in decoding or fin_at[i] != fin:
                continue  # stale entry of a preempted call
            decoding.discard(i)
            kv = prompt[i] + out[i] - 1
            freed += kv
            gen[i] = out[i]
            finish[i] = clock
            del running[i]
            done.append(i)
        self.dec_context -= freed
        self.kv_used -= freed

    def _head_admissible(self) -> bool:
        if not self.waiting or len(self.running) >= self._max_seqs:
            return False
        i = self.waiting[0]
        return self.kv_used + self.prompt[i] + self.gen[i] + self.watermark <= self.capacity

    def _make_room_for_decode(self) -> None:
        while self.decoding and self.kv_used + len(self.decoding) > self.capacity:
            self._preempt_newest()

    # --- iterations ----------------------------------------------------------------------------

    def _eager(self, load: StepLoad) -> None:
        """An iteration whose effects are applied now; they are reported at its end."""
        self.clock += self.perf.step_time(load)
        self.wake = self.clock
        self.iterations += 1

    def _v0_step(self) -> None:
        """vLLM V0: prefill-only iterations first, otherwise one decode iteration for all."""
        budget = self._token_budget
        chunks: list[int] = []
        while self._head_admissible():
            i = self.waiting[0]
            if self.prompt[i] + self.gen[i] > budget:
                break
            self._admit(i)
            budget -= self.need[i]
            chunks.append(i)
        if chunks:
            self._eager(
                StepLoad(
                    prefill_tokens=sum(self.need[i] for i in chunks),
                    prefill_pairs=sum(self.need[i] * (self.need[i] + 1) / 2 for i in chunks),
                    prefill_seqs=len(chunks),
                )
            )
            for i in chunks:
                self.prog[i] = self.need[i]
                self._start_decoding(i)
            return
        self._make_room_for_decode()
        if self.decoding:
            self._begin_run()

    def _chunked_step(self) -> None:
        """vLLM V1: decodes first, then prompt chunks up to the token budget, in one iteration."""
        decoding = self.decoding
        n_dec = len(decoding)
        if n_dec and self.kv_used + n_dec > self.capacity:
            self._make_room_for_decode()
            n_dec = len(decoding)
        prefilling, waiting, running = self.prefilling, self.waiting, self.running
        prompt, gen = self.prompt, self.gen
        max_seqs = self._max_seqs
        room = self.capacity - self.watermark  # a prompt is admitted while kv_used + it <= room
        kv_used = self.kv_used
        n_running = len(running)
        if not prefilling and (
            not waiting
            or n_running >= max_seqs
            or kv_used + prompt[waiting[0]] + gen[waiting[0]] > room
        ):
            if n_dec:  # ``_begin_run()``, inlined
                steps = self.heap[0][0] - self.decode_counter
                fill = (self.capacity - kv_used) // n_dec
                steps = min(steps, fill if fill > 1 else 1)
                found = self._coef.get(n_dec)
                a, b = found if found is not None else self._coefficients(n_dec)
                first = a + b * (self.dec_context + n_dec)
                slope = b * n_dec
                start = self.clock
                self._run = (start, steps, first, slope)
                self._run_cuttable = n_running < max_seqs and not waiting
                self.wake = start + steps * first + slope * (steps - 1) * steps / 2
            return
        budget = self._token_budget - n_dec
        need, prog = self.need, self.prog
        chunks: list[tuple[int, int]] = []
        tokens = 0
        pairs = 0.0  # causal (query, key) pairs of the chunks, summed in order
        for i in prefilling:
            if budget <= 0:
                break
            done = prog[i]
            take = need[i] - done
            take = take if take < budget else budget  # min(), without the call
            chunks.append((i, take))
            tokens += take
            pairs += done * take + take * (take + 1) / 2
            budget -= take
        while budget > 0 and waiting and n_running < max_seqs:
            i = waiting[0]
            n = prompt[i] + gen[i]
            if kv_used + n > room:
                break
            waiting.popleft()
            need[i] = n
            prog[i] = 0
            kv_used += n
            running[i] = None
            n_running += 1
            prefilling[i] = None
            take = n if n < budget else budget
            chunks.append((i, take))
            tokens += take
            pairs += take * (take + 1) / 2
            budget -= take
        # the same iteration recurs often (a lone prompt's prefill, the same chunks over a
        # steady batch): its time but the decode attention, which grows with every token, is
        # remembered (``step_fixed`` is a pure function of the load)
        load: _StepKey = (tokens, pairs, len(chunks), n_dec)
        fixed = self._steps.get(load)
        if fixed is None:
            fixed = self._steps[load] = self.perf.step_fixed(*load)
        # ``step_seconds``: the same operations, the context's part added last
        took = fixed + (self.dec_context + n_dec) * self._context_s
        clock = self.clock + took
        self.clock = self.wake = clock
        self.iterations += 1
        if n_dec:
            counter = self.decode_counter + 1
            self.decode_counter = counter
            kv_used += n_dec
            self.dec_context += n_dec
            self.kv_used = kv_used
            if self.heap[0][0] <= counter:
                self._pop_finished()
        else:
            self.kv_used = kv_used
        # prefills that ended: each emitted its first token (``_start_decoding``, inlined)
        counter = self.decode_counter
        first_token, out, fin_at, heap = self.first_token, self.out, self.fin_at, self.heap
        context = 0  # of the calls that start decoding
        for i, take in chunks:
            done = prog[i] + take
            prog[i] = done
            if done < need[i]:
                continue
            del prefilling[i]
            g = gen[i] + 1
            gen[i] = g
            if first_token[i] != first_token[i]:  # NaN: its first prefill (not a recompute)
                first_token[i] = clock
            left = out[i] - g
            if left <= 0:
                self._finish(i, need[i])
                continue
            fin = counter + left
            fin_at[i] = fin
            heapq.heappush(heap, (fin, i))
            decoding.add(i)
            context += need[i]
        if context:
            self.dec_context += context

    # --- decode runs ---------------------------------------------------------------------------

    def _coefficients(self, seqs: int) -> tuple[float, float]:
        """(a, b) with one decode iteration of ``seqs`` sequences taking a + b x context."""
        found = self._coef.get(seqs)
        if found is None:
            found = self._coef[seqs] = self.perf.decode_coefficients(seqs)
        return found

    def _begin_run(self) -> None:
        """Decode iterations over an unchanged batch, up to the next finish or a full cache."""
        n_dec = len(self.decoding)
        steps = self.heap[0][0] - self.decode_counter
        steps = min(steps, max((self.capacity - self.kv_used) // n_dec, 1))
        found = self._coef.get(n_dec)
        a, b = found if found is not None else self._coefficients(n_dec)
        # iteration j (1-based) attends over dec_context + n_dec * j tokens
        first = a + b * (self.dec_context + n_dec)
        slope = b * n_dec
        start = self.clock
        self._run = (start, steps, first, slope)
        self._run_cuttable = len(self.running) < self._max_seqs and not self.waiting
        self.wake = start + steps * first + slope * (steps - 1) * steps / 2  # the run's end

    def _cut_run(self, now: float) -> None:
        """A call that can be admitted arrived at ``now``: end the run with the iteration in
        progress (the first whose end is at or after ``now``)."""
        assert self._run is not None
        start, steps, first, slope = self._run
        # smallest s >= 1 with start + s first + slope s (s - 1) / 2 >= now
        elapsed = now - start
        if slope > 0:
            half = slope / 2
            lin = first - half
            guess = (-lin + math.sqrt(lin * lin + 4 * half * max(elapsed, 0.0))) / (2 * half)
        else:
            guess = elapsed / first
        s = max(1, min(steps, math.ceil(guess)))
        # (the end of the run's s-th iteration: start + s first + slope s (s - 1) / 2)
        while s > 1 and start + (s - 1) * first + slope * (s - 2) * (s - 1) / 2 >= now:
            s -= 1
        while s < steps and start + s * first + slope * (s - 1) * s / 2 < now:
            s += 1
        self._run_cuttable = False
        if s < steps:
            self._run = (start, s, first, slope)
            self.wake = start + s * first + slope * (s - 1) * s / 2
            self.epoch += 1

    def _commit_run(self, steps: int) -> None:
        assert self._run is not None
        start, _, first, slope = self._run
        n_dec = len(self.decoding)
        self.clock = start + steps * first + slope * (steps - 1) * steps / 2  # the run's end
        self._run = None
        self.iterations += steps
        self.decode_counter += steps
        self.kv_used += n_dec * steps
        self.dec_context += n_dec * steps
        self._pop_finished()
