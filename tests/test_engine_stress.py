"""Seeded random workloads on one engine: requests of every kind (greedy, sampled, beams, stop
strings, min tokens, logprobs, keep_ratio, history, choices, logit bias, allowed ids, priorities, bad input) arrive at random steps into a KV
pool too small for all of them and a small token budget (chunked prefills, preemption by
recompute, prefix-cache hits), and random ones are aborted at random moments. Every request that
was not aborted must return exactly what it returns alone on a roomy engine, every aborted one
must end once with "abort", and the pool, the scheduler and the frame loader must end empty."""
import random

import pytest

from stllm_engine.sampling_params import SamplingParams
from stllm_engine.testing.videos import write_video

from test_engine import assert_clean, make_engine, run

QUESTIONS = ["what is moving in the video?", "which color is the square?", "how many shapes?",
             "a?", "does the circle go left or right in the clip?"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("stress")
    return [str(write_video(d / "a.mp4", num_frames=20, size=(96, 72), seed=1)),
            str(write_video(d / "b.gif", num_frames=12, size=(64, 64), seed=2, fmt="gif")),
            str(write_video(d / "c.mp4", num_frames=30, size=(80, 60), seed=3))]


def random_request(rng: random.Random, videos, missing: str):
    """One (video, question, params, kwargs) drawn from the kinds a server sees."""
    kind = rng.choice(["greedy", "greedy", "sampled", "beams", "stop", "keep", "history", "logprobs",
                       "choices", "bias"])
    video, q = rng.choice(videos), rng.choice(QUESTIONS)
    kw, p = {}, dict(max_new_tokens=rng.randint(1, 24))
    if rng.random() < 0.5:
        p["repetition_penalty"] = 1.0
    if kind == "sampled":
        p.update(temperature=rng.choice([0.7, 1.0, 1.3]), top_p=rng.choice([0.8, 1.0]),
                 top_k=rng.choice([0, 5, 20]), seed=rng.randint(0, 99))
    elif kind == "beams":
        p.update(num_beams=rng.choice([2, 3]))
    elif kind == "stop":
        p.update(stop=[rng.choice(["e", "a", " the", "s"])], min_new_tokens=rng.randint(0, min(3, p["max_new_tokens"])))
    elif kind == "keep":
        kw.update(keep_ratio=rng.choice([0.3, 0.5, 0.9]), keep_mode=rng.choice(["even", "random"]),
                  keep_seed=rng.randint(0, 9))
    elif kind == "history":
        kw["history"] = [(rng.choice(QUESTIONS), rng.choice(["a square.", "left", "two of them"]))
                         for _ in range(rng.randint(1, 2))]
    elif kind == "logprobs":
        p.update(logprobs=rng.randint(0, 3))
    elif kind == "choices":
        p.update(choices=rng.choice([["yes", "no"], ["a red square", "a blue circle", "red"]]),
                 num_beams=rng.choice([1, 1, 2]), temperature=0.0)
        p.pop("min_new_tokens", None)
    elif kind == "bias":
        ids = rng.sample(range(3, 200), 3)
        if rng.random() < 0.5:
            p.update(logit_bias={t: rng.uniform(-100, 100) for t in ids})
        else:
            p.update(allowed_token_ids=ids + [2])
    if rng.random() < 0.3:
        kw["priority"] = rng.choice([-1, 1, 2])
    if rng.random() < 0.06:
        video = missing
    return video, q, SamplingParams(**p), kw


def blocks_needed(out, params, block_size=8):
    """KV blocks one request needs at its peak when it runs alone (every beam its own tail)."""
    per_seq = -(-(out.num_prompt_tokens + params.max_new_tokens) // block_size)
    return per_seq * max(1, params.num_beams) + 1


@pytest.mark.parametrize("seed", range(10))
def test_random_workload_with_aborts_and_preemption_equals_each_alone(folders, videos, tmp_path, seed):
    rng = random.Random(seed)
    f = folders(*[("eva", "all"), ("btadapter", "residual"), ("eva", "mean")][seed % 3])
    reqs = [random_request(rng, videos, str(tmp_path / "missing.mp4")) for _ in range(20)]
    solo = make_engine(f, num_kv_blocks=256)
    alone = [run(solo, [r])[0] for r in reqs]
    need = max(blocks_needed(o, r[2]) for o, r in zip(alone, reqs) if o.error is None)
    eng = make_engine(f, num_kv_blocks=need + rng.randint(0, 2), max_num_batched_tokens=rng.choice([24, 40, 64]),
                      max_num_seqs=rng.choice([3, 8]))

    arrive = sorted(rng.randint(0, rng.choice([3, 12])) for _ in reqs)  # the step before which request i is added
    abort_at = {i: arrive[i] + rng.randint(0, 12) for i in rng.sample(range(len(reqs)), 6)}
    rids, finals, step = [None] * len(reqs), {}, 0
    aborted = set()
    while step < 5000:
        for i, t in enumerate(arrive):
            if t == step:
                v, q, p, kw = reqs[i]
                rids[i] = eng.add_request(v, q, p, **kw)
        for i, t in abort_at.items():
            if t == step and rids[i] is not None and rids[i] not in finals:
                if eng.abort(rids[i]):  # False: it already ended (a bad request), its output is pending
                    aborted.add(i)
        for o in eng.step():
            if o.finished:
                assert o.request_id not in finals, "a request finished twice"
                finals[o.request_id] = o
        step += 1
        if step > max(arrive) and not eng.has_unfinished_requests():
            break
    assert len(finals) == len(reqs)
    for i, (rid, a) in enumerate(zip(rids, alone)):
        o = finals[rid]
        if i in aborted:
            assert o.finish_reason == "abort" and o.error is None
            assert o.token_ids == a.token_ids[:len(o.token_ids)] or reqs[i][2].num_beams > 1
            continue
        assert (o.token_ids, o.finish_reason, o.error) == (a.token_ids, a.finish_reason, a.error), i
        assert o.text == a.text
        if reqs[i][2].logprobs is not None:
            assert (o.logprobs is None) == (a.logprobs is None), (i, o.error, reqs[i], o.logprobs, a.logprobs)
        if reqs[i][2].logprobs is not None and a.logprobs is not None:
            assert [lp.token_id for lp in o.logprobs] == [lp.token_id for lp in a.logprobs]
            assert [lp.logprob for lp in o.logprobs] == pytest.approx([lp.logprob for lp in a.logprobs], abs=1e-4)
    assert_clean(eng)
    by_reason = {}
    for o in finals.values():
        by_reason[o.finish_reason] = by_reason.get(o.finish_reason, 0) + 1
    counted = eng.stats()["requests"]["requests_finished"]
    assert {k: v for k, v in counted.items() if v} == by_reason
    print(f"seed {seed}: {by_reason}, preemptions {eng.scheduler.num_preemptions}, "
          f"prefix hits {eng.stats()['kv']['prefix_hit_tokens']}")
