"""Concurrent callers: 8 threads on one Pipeline get exactly the answers each request gets alone, with no deadlock.

The pool mixes every crop count, input kind, budget and option (tests.helpers.request_pool); a few requests in the
schedule are invalid, so failing requests run beside good ones. Throughput (requests/s) single-thread vs 8
threads is printed (`pytest -s`). Streams abandoned by their caller, started or not, must not keep
`close()` waiting.
"""

from __future__ import annotations

import gc
import sys
import threading
import time

import numpy as np
import pytest

from runtime.errors import BudgetError, HiredError, PipelineClosedError
from runtime.pipeline import Pipeline
from tests.helpers import request_pool

THREADS = 8
PER_THREAD = 24  # 192 requests in all
SINGLE = 24  # requests timed on one thread for the throughput baseline
JOIN_S = 600.0  # a run that has not finished by then is deadlocked (it takes well under a minute)
INVALID_EVERY = 6  # every 6th request of a thread asks for budget=2.0 (BudgetError)
SIZES = ((640, 320), (300, 620), (990, 330), (700, 660), (23, 17), (1, 400))


@pytest.fixture(scope="module")
def pool(pipe, tmp_path_factory):
    """(requests, their image arguments, tokens of each run alone)."""
    cases = request_pool(8, seed=3, sizes=SIZES, max_new_tokens=2, workdir=tmp_path_factory.mktemp("concurrency"))
    images = [c.image for c in cases]
    alone = [c.run(pipe) for c in cases]
    expected = [tuple(r.token_ids) for r in alone]
    crops = sorted({len(r.visual_tokens["per_image"]) - 1 for r in alone})
    assert crops == [2, 3, 4], "the pool must cover every crop count"
    return cases, images, expected


def schedule(thread: int, n: int, n_cases: int) -> list[int]:
    """Case index of each request of `thread`; -1 marks an invalid request. Threads start on different cases."""
    return [-1 if (i + 1) % INVALID_EVERY == 0 else (thread * 5 + i * 3) % n_cases for i in range(n)]


def run_one(pipe, pool, k: int, use_stream: bool):
    """Tokens of request `k` of the pool (or the BudgetError of an invalid one); streams must add up to the text."""
    cases, images, _ = pool
    if k < 0:
        try:
            pipe.generate(images[0], "What is it?", budget=2.0, max_new_tokens=2)
        except BudgetError as e:
            return e
        raise AssertionError("budget=2.0 was accepted")
    if not use_stream:
        return tuple(cases[k].run(pipe).token_ids)
    stream = pipe.stream(images[k], cases[k].prompt, **cases[k].options)
    text = "".join(stream)
    assert text == stream.result.text
    return tuple(stream.result.token_ids)


@pytest.mark.slow  # 216 requests (minutes on 2 cores); test_runtime's threads test is the fast tier's check
def test_eight_threads_get_the_answers_each_request_gets_alone(pipe, pool):
    cases, _, expected = pool
    plans = [schedule(t, PER_THREAD, len(cases)) for t in range(THREADS)]
    results: dict[tuple[int, int], object] = {}
    failures: list[str] = []
    start = threading.Barrier(THREADS + 1)

    def worker(t: int) -> None:
        start.wait()
        for i, k in enumerate(plans[t]):
            try:
                results[t, i] = run_one(pipe, pool, k, use_stream=(t % 2 == 1))
            except Exception as e:  # reported below with the thread and request that failed
                failures.append(f"thread {t} request {i} (case {k}): {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(THREADS)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join(JOIN_S)
    many_s = time.perf_counter() - t0
    assert not any(th.is_alive() for th in threads), f"threads still running after {JOIN_S:.0f} s: deadlock"
    assert not failures, failures[:3]

    wrong = []
    for (t, i), got in results.items():
        k = plans[t][i]
        if k < 0:
            assert isinstance(got, BudgetError)
        elif got != expected[k]:
            wrong.append(f"thread {t} request {i} ({cases[k].name}): {got} != {expected[k]}")
    assert len(results) == THREADS * PER_THREAD
    assert not wrong, f"{len(wrong)} answers differ from the same request alone: {wrong[:3]}"

    single_plan = [k for t in range(THREADS) for k in plans[t]][:: THREADS * PER_THREAD // SINGLE][:SINGLE]
    t0 = time.perf_counter()
    for k in single_plan:
        got = run_one(pipe, pool, k, use_stream=False)
        assert k < 0 or got == expected[k]
    one_s = time.perf_counter() - t0
    n_many = THREADS * PER_THREAD
    print(
        f"\nthroughput: 1 thread {SINGLE / one_s:.2f} requests/s ({SINGLE} in {one_s:.1f} s); "
        f"{THREADS} threads {n_many / many_s:.2f} requests/s ({n_many} in {many_s:.1f} s); "
        f"ratio {(n_many / many_s) / (SINGLE / one_s):.2f}",
        file=sys.stderr,
    )


def test_abandoned_streams_do_not_keep_close_waiting(tiny_bundle):
    p = Pipeline.load(tiny_bundle)
    image = np.zeros((20, 30, 3), np.uint8)
    never_started = p.stream(image, "What is it?", max_new_tokens=1)
    half_read = p.stream(image, "What is it?", max_new_tokens=3)
    next(half_read)
    del never_started, half_read
    gc.collect()
    closer = threading.Thread(target=p.close, daemon=True)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "close() waits forever for streams nobody will finish"
    with pytest.raises(HiredError, match="closed"):
        p.generate(image, "What is it?", max_new_tokens=1)


def test_close_waits_for_requests_in_flight_which_still_answer_right(tiny_bundle, pool):
    cases, images, expected = pool
    p = Pipeline.load(tiny_bundle)
    started = threading.Barrier(4 + 1)
    got: dict[int, tuple] = {}

    def worker(k: int) -> None:
        stream = p.stream(images[k], cases[k].prompt, **cases[k].options)
        started.wait()
        for _ in stream:
            time.sleep(0.05)  # a slow consumer: close() must wait for it
        got[k] = tuple(stream.result.token_ids)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(4)]
    for th in threads:
        th.start()
    started.wait()
    closer = threading.Thread(target=p.close, daemon=True)
    closer.start()
    closer.join(JOIN_S)
    assert not closer.is_alive(), "close() never returned"
    for th in threads:
        th.join(JOIN_S)
    assert got == {k: expected[k] for k in range(4)}, "requests in flight when close() was called went wrong"
    with pytest.raises(HiredError, match="closed"):
        p.generate(images[0], "What is it?", max_new_tokens=1)


def test_close_ends_the_streams_its_own_thread_still_holds_at_once(tiny_bundle):
    image = np.zeros((20, 30, 3), np.uint8)
    with Pipeline.load(tiny_bundle) as p:
        never_started = p.stream(image, "What is it?", max_new_tokens=4)
        half_read = p.stream(image, "Describe it.", max_new_tokens=4, min_new_tokens=4)
        for _ in half_read:
            break
        t0 = time.perf_counter()
    # leaving the block closed the Pipeline while both streams are still referenced
    assert time.perf_counter() - t0 < 5.0, "close() waited for streams only this thread could advance"
    assert p.active_requests == 0
    for stream in (never_started, half_read):
        with pytest.raises(PipelineClosedError, match="closed"):
            next(stream)
    with pytest.raises(PipelineClosedError, match="closed; load a new one"):
        p.generate(image, "What is it?", max_new_tokens=1)
    p.close()  # a second close is harmless


def test_close_gives_other_threads_its_timeout_then_cancels_them(tiny_bundle):
    image = np.zeros((40, 60, 3), np.uint8)
    p = Pipeline.load(tiny_bundle)
    outcome: dict[str, object] = {}
    running, parked, release = threading.Event(), threading.Event(), threading.Event()

    def long_request() -> None:  # thousands of decode steps: it cannot finish within the timeout
        stream = p.stream(image, "Tell a long story.", max_new_tokens=3000, min_new_tokens=3000)
        try:
            for i, _ in enumerate(stream):
                if i == 1:
                    running.set()
            outcome["long"] = "finished"
        except HiredError as e:
            outcome["long"] = e

    def parked_stream() -> None:  # reads one piece, then leaves its stream open and waits
        stream = p.stream(image, "What is it?", max_new_tokens=8, min_new_tokens=8)
        next(stream)
        parked.set()
        release.wait(60)
        try:
            next(stream)
            outcome["parked"] = "advanced"
        except HiredError as e:
            outcome["parked"] = e

    threads = [threading.Thread(target=f, daemon=True) for f in (long_request, parked_stream)]
    for th in threads:
        th.start()
    assert running.wait(120) and parked.wait(120)
    t0 = time.perf_counter()
    p.close(timeout=0.5)
    took = time.perf_counter() - t0
    release.set()
    for th in threads:
        th.join(30)
    assert not any(th.is_alive() for th in threads), "a request went on after close() cancelled it"
    assert 0.5 <= took < 5.0, f"close(timeout=0.5) took {took:.2f} s"
    assert isinstance(outcome["long"], PipelineClosedError), outcome["long"]
    assert isinstance(outcome["parked"], PipelineClosedError), outcome["parked"]
    assert all("\n" not in str(outcome[k]) and "closed" in str(outcome[k]) for k in outcome)
    assert p.active_requests == 0


@pytest.mark.parametrize("timeout", [-1, float("nan"), "5", None, True])
def test_close_timeout_must_be_seconds(tiny_bundle, timeout):
    p = Pipeline.load(tiny_bundle)
    with pytest.raises(HiredError, match="timeout must be a number of seconds"):
        p.close(timeout=timeout)
    p.close()


def test_closing_a_stream_frees_its_slot_started_or_not(pipe):
    image = np.zeros((20, 30, 3), np.uint8)
    before = pipe.active_requests
    never_started = pipe.stream(image, "What is it?", max_new_tokens=4)
    half_read = pipe.stream(image, "Describe it.", max_new_tokens=4, min_new_tokens=4)
    next(half_read)
    assert pipe.active_requests == before + 2
    for stream in (never_started, half_read):
        stream.close()
        stream.close()  # twice is harmless
        with pytest.raises(StopIteration):
            next(stream)
        assert stream.result is None
    assert pipe.active_requests == before
    done = pipe.stream(image, "What is it?", max_new_tokens=1)
    list(done)
    done.close()
    assert done.result is not None and pipe.active_requests == before
