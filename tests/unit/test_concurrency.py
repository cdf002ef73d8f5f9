"""Many users at once on the tiny random GLM-4.1V checkpoint (float32): batch invariance with images, KV blocks
always returned, prefix-cache hits equal misses, encoder work once per media item, backpressure (Overloaded,
timeouts, drain)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from autoglm.config import EngineConfig
from autoglm.engine.async_engine import AsyncEngine
from autoglm.engine.engine import Engine, RequestOutput
from autoglm.engine.prompt import PromptInputs, build_chat_prompt
from autoglm.engine.sampling_params import SamplingParams
from autoglm.errors import Overloaded, RequestTimeout, ServiceUnavailable
from autoglm.loader import load_model
from autoglm.models.loaded import LoadedModel

WORDS = "open the settings app then tap wifi and read the network name aloud please".split()


@pytest.fixture(scope="module")
def vmodel(tiny_glm4v_dir: Path) -> LoadedModel:
    return load_model(tiny_glm4v_dir)


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, repetition_penalty=1.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def chat_prompt(model: LoadedModel, text: str, images: list[Image.Image] = (), system: str | None = None
                ) -> PromptInputs:  # type: ignore[assignment]
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": im}} for im in images]
    parts.append({"type": "text", "text": text})
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": parts})
    return build_chat_prompt(model, messages)


def sixteen_prompts(model: LoadedModel) -> list[PromptInputs]:
    """Different lengths; every third has an image (sizes vary, one spans many chunks), one has two."""
    out = []
    for i in range(16):
        text = " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(2 + (i * 7) % 23))
        images: list[Image.Image] = []
        if i % 3 == 0:
            images = [image(56 + 28 * (i % 4), 84 + 28 * (i % 2), seed=i)]
        if i == 9:
            images = [image(224, 168, seed=90), image(84, 56, seed=91)]  # 48 + 6 slots
        out.append(chat_prompt(model, text, images))
    return out


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def run_to_end(engine: Engine, on_step: Callable[[int], bool] | None = None) -> dict[str, list[RequestOutput]]:
    """Step until done; `on_step(step)` runs before each step and returns True while it has more to add."""
    outs: dict[str, list[RequestOutput]] = {}
    step = 0
    while (on_step is not None and on_step(step)) | engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        step += 1
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "KV blocks leaked"
    return outs


def check_kv_consistent(engine: Engine) -> None:
    """Every block's ref count equals the number of live block tables holding it; free <=> ref count 0."""
    kv = engine.kv
    owners = [0] * kv.num_blocks
    for req in engine.scheduler.running + list(engine.scheduler.waiting):
        for b in req.block_table:
            owners[b] += 1
    assert [blk.ref_count for blk in kv.blocks] == owners
    assert set(kv.free_block_ids) == {i for i, n in enumerate(owners) if n == 0}
    for req in engine.scheduler.waiting:
        assert not req.block_table  # waiting (incl. preempted) requests own nothing


def max_tokens_for(i: int) -> int:
    return 6 + (i * 5) % 11


@pytest.fixture(scope="module")
def alone(vmodel: LoadedModel) -> list[list[int]]:
    """Each of the 16 requests alone in an engine with no prefix or encoder caching."""
    prompts = sixteen_prompts(vmodel)
    engine = Engine(vmodel, EngineConfig(block_size=4, enable_prefix_caching=False, encoder_cache_memory=0))
    out = []
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(max_tokens_for(i)))
        out.append(tokens(run_to_end(engine)[str(i)]))
    return out


# --- batch invariance ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,seqs,prefix", [(2048, 16, False), (40, 6, True)])
def test_16_concurrent_requests_equal_alone(vmodel: LoadedModel, alone: list[list[int]], budget: int,
                                            seqs: int, prefix: bool) -> None:
    """All 16 at once (and, second case, chunked prefill mixed with decode, a batch cap, late arrivals, prefix
    caching)."""
    prompts = sixteen_prompts(vmodel)
    engine = Engine(vmodel, EngineConfig(block_size=4, max_num_batched_tokens=budget, max_num_seqs=seqs,
                                         enable_prefix_caching=prefix))
    late = list(range(16))[::-1]
    first = 16 if budget == 2048 else 8

    def arrive(step: int) -> bool:
        if step == 0:
            for _ in range(first):
                i = late.pop()
                engine.add_request(str(i), prompts[i], greedy(max_tokens_for(i)))
        elif late and step % 3 == 0:  # the rest join mid-generation
            i = late.pop()
            engine.add_request(str(i), prompts[i], greedy(max_tokens_for(i)))
        check_kv_consistent(engine)
        return bool(late)

    outs = run_to_end(engine, arrive)
    assert [tokens(outs[str(i)]) for i in range(16)] == alone


def test_16_concurrent_through_async_engine(vmodel: LoadedModel, alone: list[list[int]]) -> None:
    prompts = sixteen_prompts(vmodel)
    engine = AsyncEngine(Engine(vmodel, EngineConfig(block_size=4, max_num_batched_tokens=64)))

    async def one(i: int) -> list[int]:
        await asyncio.sleep(0.002 * i)
        ids: list[int] = []
        async for out in engine.generate(str(i), prompts[i], greedy(max_tokens_for(i))):
            ids += out.new_token_ids
        return ids

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i) for i in range(16))))

    try:
        assert asyncio.run(main()) == alone
        assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["in_flight"] == 0
    finally:
        engine.shutdown()


# --- encoder work --------------------------------------------------------------------------------------------------
def test_image_span_across_chunks_encoded_once(vmodel: LoadedModel) -> None:
    prompt = chat_prompt(vmodel, "what is on the screen", [image(224, 224, seed=5)])
    item = prompt.media[0]
    assert item.n_slots > 3 * 7
    ref = Engine(vmodel, EngineConfig(block_size=4, enable_prefix_caching=False, encoder_cache_memory=0))
    ref.add_request("r", prompt, greedy(8))
    expect = tokens(run_to_end(ref)["r"])
    assert ref.runner.num_encoder_runs == 1
    # a 7-token budget cuts the image's slots over many steps: encoded once, sliced per chunk
    chunked = Engine(vmodel, EngineConfig(block_size=4, max_num_batched_tokens=7, enable_prefix_caching=False,
                                          encoder_cache_memory=0))
    chunked.add_request("c", prompt, greedy(8))
    steps_in_image = 0
    got: list[int] = []
    while chunked.has_unfinished():
        req = chunked.scheduler.running[0] if chunked.scheduler.running else None
        if req is not None and item.offset < req.num_computed_tokens < item.offset + item.n_slots:
            steps_in_image += 1
        got += tokens(chunked.step())
    assert steps_in_image >= 2 and chunked.runner.num_encoder_runs == 1
    assert got == expect
    chunked.add_request("c2", prompt, greedy(8))
    assert tokens(run_to_end(chunked)["c2"]) == expect
    assert chunked.runner.num_encoder_runs == 2  # no cache at all: a new request encodes again


def test_same_image_encoded_once_across_requests_and_preemption(vmodel: LoadedModel) -> None:
    screen = image(168, 112, seed=11)
    prompts = [chat_prompt(vmodel, f"step {i}: {' '.join(WORDS[: 3 + i])}", [screen]) for i in range(4)]
    ref = Engine(vmodel, EngineConfig(block_size=4, enable_prefix_caching=False, encoder_cache_memory=0))
    expect = []
    for i, p in enumerate(prompts):
        ref.add_request(str(i), p, greedy(10))
        expect.append(tokens(run_to_end(ref)[str(i)]))
    # prefix caching off, encoder cache on, a KV budget that forces preemption: one encoder run in total
    # room for the first two prompts (+1 block) at admission; their decodes then outgrow it
    blocks = sum((len(p.token_ids) + 3) // 4 for p in prompts[:2]) + 1
    assert blocks * 4 >= max(len(p.token_ids) for p in prompts) + 10
    engine = Engine(vmodel, EngineConfig(block_size=4, enable_prefix_caching=False, num_kv_blocks=blocks))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(10))
    outs = run_to_end(engine)
    assert [tokens(outs[str(i)]) for i in range(4)] == expect
    assert engine.scheduler.num_preemptions > 0
    assert engine.runner.num_encoder_runs == 1 and engine.stats()["encoder_cache_hits"] >= 3


def test_encoder_cache_is_bounded(vmodel: LoadedModel) -> None:
    from autoglm.engine.encoder_cache import EncoderCache

    cache = EncoderCache(max_bytes=3 * 40 * 4)
    for i in range(5):
        cache.put("image", str(i), torch.zeros(10, 4))  # 160 bytes each
    assert len(cache) == 3 and cache.bytes == 480 and cache.get("image", "0") is None
    assert cache.get("image", "2") is not None
    cache.put("image", "5", torch.zeros(10, 4))  # evicts the least recently used ("3"), keeps "2"
    assert cache.get("image", "2") is not None and cache.get("image", "3") is None
    cache.put("image", "big", torch.zeros(100, 4))  # larger than the cache: not kept
    assert cache.get("image", "big") is None and cache.bytes <= cache.max_bytes


# --- prefix caching ------------------------------------------------------------------------------------------------
SYSTEM = ("You are a phone agent. Look at the screenshot, think, then answer with one action: "
          "Launch, Tap, Type, Swipe, Back, Home, Wait or Finish. " * 3)


@pytest.mark.parametrize("with_image", [False, True])
def test_prefix_hit_gives_same_logprobs_as_miss(vmodel: LoadedModel, with_image: bool) -> None:
    shot = [image(112, 168, seed=21)] if with_image else []
    p1 = chat_prompt(vmodel, "open chrome", shot, system=SYSTEM)
    p2 = chat_prompt(vmodel, "now open settings and tap wifi", shot, system=SYSTEM)
    params = greedy(6, logprobs=5)
    miss = Engine(vmodel, EngineConfig(block_size=4, enable_prefix_caching=False))
    miss.add_request("b", p2, params)
    ref = run_to_end(miss)["b"]
    hit = Engine(vmodel, EngineConfig(block_size=4, enable_prefix_caching=True))
    hit.add_request("a", p1, params)
    run_to_end(hit)
    hit.add_request("b", p2, params)
    got = run_to_end(hit)["b"]
    shared = next(i for i, (x, y) in enumerate(zip(p1.token_ids, p2.token_ids, strict=False)) if x != y)
    assert hit.scheduler.num_cached_tokens >= shared // 4 * 4 - 4 > 0  # the system prompt (+ image) was reused
    assert tokens(got) == tokens(ref)
    lp_ref = [lp for o in ref for lp in o.logprobs]
    lp_got = [lp for o in got for lp in o.logprobs]
    for a, b in zip(lp_ref, lp_got, strict=True):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        torch.testing.assert_close(torch.tensor([v for _, v in b.top]), torch.tensor([v for _, v in a.top]),
                                   atol=1e-5, rtol=1e-5)
    stats = hit.stats()
    assert 0 < stats["prefix_cache_hit_rate"] < 1


def test_phone_agent_system_prompt_computed_once(vmodel: LoadedModel) -> None:
    """4 devices x 3 steps, a new screenshot each step: the system prompt blocks are computed once."""
    engine = Engine(vmodel, EngineConfig(block_size=4, enable_prefix_caching=True))
    for step in range(3):
        for dev in range(4):
            p = chat_prompt(vmodel, f"device {dev} step {step}", [image(84, 140, seed=100 * dev + step)],
                            system=SYSTEM)
            engine.add_request(f"{dev}-{step}", p, greedy(4))
        run_to_end(engine)
    n_system = len(chat_prompt(vmodel, "x", system=SYSTEM).token_ids)
    # every request after the very first, including the 3 that arrived with it, reused the system prompt
    assert engine.scheduler.num_cached_tokens >= 11 * (n_system // 4 - 1) * 4
    assert engine.scheduler.num_prefix_waits >= 1 and engine.stats()["prefix_cache_hit_rate"] > 0.5


def test_prefix_caching_default_on_for_the_server_only() -> None:
    assert EngineConfig().enable_prefix_caching is False  # LLM / bench: no state carried across calls
    server = {"enable_prefix_caching": True}  # what autoglm serve passes as its default
    assert EngineConfig.from_sources(env={}, defaults=server).enable_prefix_caching is True
    off = {"AUTOGLM_ENABLE_PREFIX_CACHING": "0"}
    assert EngineConfig.from_sources(env=off, defaults=server).enable_prefix_caching is False
    assert EngineConfig.from_sources({"enable_prefix_caching": False}, env={}, defaults=server).enable_prefix_caching \
        is False


# --- invariants under a random mix --------------------------------------------------------------------------------
OPS = st.lists(st.tuples(st.sampled_from(["add", "add_image", "step", "step", "step", "abort"]),
                         st.integers(0, 1000)), min_size=5, max_size=40)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, prefix=st.booleans())
def test_random_mix_returns_every_block(vmodel: LoadedModel, ops: list[tuple[str, int]], prefix: bool) -> None:
    """Adds (text / image, shared prefixes), steps, aborts; a KV budget small enough to preempt."""
    engine = Engine(vmodel, EngineConfig(block_size=4, num_kv_blocks=30, max_num_batched_tokens=24,
                                         max_num_seqs=4, enable_prefix_caching=prefix))
    shots = [image(56, 56, seed=s) for s in range(2)]
    n = 0
    for op, k in ops:
        if op.startswith("add"):
            words = " ".join(WORDS[: 1 + k % 12])
            p = chat_prompt(vmodel, words, [shots[k % 2]] if op == "add_image" else [], system="be brief")
            engine.add_request(f"r{n}", p, greedy(1 + k % 9))
            n += 1
        elif op == "abort" and engine.requests:
            ids = sorted(engine.requests)
            engine.abort(ids[k % len(ids)])
        else:
            engine.step()
        check_kv_consistent(engine)
    run_to_end(engine)
    check_kv_consistent(engine)
    assert not engine.requests and engine.kv.num_used_blocks == 0


def test_async_mix_finish_abort_disconnect_preempt(vmodel: LoadedModel) -> None:
    """Through AsyncEngine: finished, aborted, cancelled-iterator (disconnect), closed-early and preempted requests
    on a small KV budget; afterwards every block is free and nothing is in flight."""
    inner = Engine(vmodel, EngineConfig(block_size=4, num_kv_blocks=24, max_num_seqs=6, max_num_batched_tokens=32,
                                        enable_prefix_caching=True))
    _slow(inner, 0.003)  # so that cancellations land mid-stream
    engine = AsyncEngine(inner)
    rng = random.Random(7)
    shot = image(84, 84, seed=3)

    async def client(i: int) -> str:
        p = chat_prompt(vmodel, " ".join(WORDS[: 2 + i % 10]), [shot] if i % 4 == 0 else [], system="be brief")
        fate = ["finish", "cancel", "close", "abort"][i % 4]
        stop_after = rng.randint(1, 5)
        n = 0
        gen = engine.generate(f"c{i}", p, greedy(10 + i % 13))
        async for _ in gen:
            n += 1
            if n == stop_after and fate == "close":
                await gen.aclose()
                return "closed"
            if n == stop_after and fate == "abort":
                engine.abort(f"c{i}")
        return "done"

    async def main() -> None:
        tasks = [asyncio.create_task(client(i)) for i in range(24)]
        await asyncio.sleep(0.05)
        for i in range(1, 24, 4):  # disconnects: the handler task is cancelled mid-stream
            tasks[i].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(300):
            if engine.num_in_flight == 0 and engine.stats()["kv_blocks_used"] == 0:
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        s = engine.stats()
        assert s["kv_blocks_used"] == 0 and s["in_flight"] == 0 and s["running"] == 0 and s["waiting"] == 0
        assert s["requests_finished"] >= 6 and s["requests_aborted"] >= 6 and s["preemptions"] > 0
        check_kv_consistent(engine.engine)
    finally:
        engine.shutdown()


# --- backpressure --------------------------------------------------------------------------------------------------
def test_overloaded_at_max_waiting(vmodel: LoadedModel) -> None:
    p = chat_prompt(vmodel, "hi")
    engine = Engine(vmodel, EngineConfig(block_size=4, max_num_seqs=1, max_waiting=2))
    engine.add_request("a", p, greedy(3))
    engine.step()  # a runs
    engine.add_request("b", p, greedy(3))
    engine.add_request("c", p, greedy(3))
    with pytest.raises(Overloaded, match="waiting queue is full") as err:
        engine.add_request("d", p, greedy(3))
    assert err.value.status == 429
    run_to_end(engine)
    engine.add_request("d", p, greedy(3))  # room again

    aeng = AsyncEngine(Engine(vmodel, EngineConfig(block_size=4, max_waiting=3)), start=False)

    async def main() -> None:
        for i in range(3):
            aeng.add_request(f"w{i}", p, greedy(3))
        with pytest.raises(Overloaded):
            aeng.add_request("w3", p, greedy(3))
        assert aeng.stats()["requests_rejected"] == 1

    asyncio.run(main())
    aeng.shutdown()


def _slow(engine: Engine, seconds: float) -> None:
    """Make every engine step take at least `seconds` (a stand-in for a big model)."""
    run = engine.runner.run

    def slow_run(batch: Any) -> Any:
        time.sleep(seconds)
        return run(batch)

    engine.runner.run = slow_run  # type: ignore[method-assign]


def test_request_timeout(vmodel: LoadedModel) -> None:
    p = chat_prompt(vmodel, "count to a thousand")
    engine = Engine(vmodel, EngineConfig(block_size=4, request_timeout=30.0))
    req = engine.add_request("a", p, greedy(500))
    engine.add_request("b", p, greedy(3), timeout=1000.0)  # per-request override
    engine.step()
    assert engine.kv.num_used_blocks > 0
    outs = engine.expire(now=req.arrival_time + 31)
    assert [o.request_id for o in outs] == ["a"] and isinstance(outs[0].error, RequestTimeout)
    assert outs[0].finished and "timed out after 30 s" in str(outs[0].error)
    run_to_end(engine)
    assert engine.stats()["timeouts"] == 1

    inner = Engine(vmodel, EngineConfig(block_size=4))
    _slow(inner, 0.02)
    aeng = AsyncEngine(inner)

    async def main() -> float:
        t0 = time.monotonic()
        got = 0
        with pytest.raises(RequestTimeout):
            async for out in aeng.generate("slow", p, greedy(900), timeout=0.5):
                got += len(out.new_token_ids)
        assert 0 < got < 900
        ok = [t async for o in aeng.generate("fast", p, greedy(3)) for t in o.new_token_ids]
        assert len(ok) == 3
        return time.monotonic() - t0

    try:
        assert asyncio.run(main()) < 10
        assert aeng.stats()["kv_blocks_used"] == 0 and aeng.stats()["timeouts"] == 1
    finally:
        aeng.shutdown()


def test_drain(vmodel: LoadedModel) -> None:
    p = chat_prompt(vmodel, "hello there")
    inner = Engine(vmodel, EngineConfig(block_size=4))
    _slow(inner, 0.02)
    aeng = AsyncEngine(inner)

    async def consume(rid: str, n: int) -> tuple[int, BaseException | None]:
        got = 0
        try:
            async for out in aeng.generate(rid, p, greedy(n)):
                got += len(out.new_token_ids)
        except ServiceUnavailable as e:
            return got, e
        return got, None

    async def main() -> None:
        short = asyncio.create_task(consume("short", 5))
        long = asyncio.create_task(consume("long", 900))
        await asyncio.sleep(0.3)  # both admitted and streaming
        drained = asyncio.create_task(aeng.drain(1.5))
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceUnavailable, match="draining"):
            aeng.add_request("late", p, greedy(3))
        assert (await short) == (5, None)  # finished within the grace period
        got, err = await long
        assert err is not None and "drain grace period" in str(err) and 0 < got < 900
        assert await drained is False

    try:
        asyncio.run(main())
        s = aeng.stats()
        assert s["kv_blocks_used"] == 0 and s["in_flight"] == 0 and s["draining"]
        assert s["requests_drain_aborted"] == 1 and s["requests_rejected"] == 1
    finally:
        aeng.shutdown()

    # everything finishes inside the grace period: drain says so
    quick = AsyncEngine(Engine(vmodel, EngineConfig(block_size=4)))

    async def main2() -> bool:
        task = asyncio.create_task(consume_quick(quick, p))
        await asyncio.sleep(0.01)
        ok = await quick.drain(30)
        await task
        return ok

    try:
        assert asyncio.run(main2()) is True
    finally:
        quick.shutdown()


async def consume_quick(engine: AsyncEngine, p: PromptInputs) -> int:
    return len([t async for o in engine.generate("q", p, greedy(4)) for t in o.new_token_ids])
