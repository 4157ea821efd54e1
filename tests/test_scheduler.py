"""Scheduler with a KV-checking fake runner: token budget, chunked prefill, preemption by
recompute, abort in every state, FCFS without starvation, no block leaks.

The fake runner keeps a dict slot -> (position identity) standing in for the KV cache: before a
chunk runs it verifies that every earlier position of the sequence is in the cache where the block
table says (so prefix hits, preemption/recompute and copy-on-write are checked), then writes the
chunk. The next token is a pure function of the sequence's tokens, so any schedule must give the
same outputs.
"""
import pytest
import torch

from stllm_engine.engine.block_manager import BlockManager
from stllm_engine.engine.scheduler import Scheduler
from stllm_engine.engine.sequence import Sequence, SequenceStatus
from stllm_engine.sampling_params import SamplingParams


class KVCheckingRunner:
    def __init__(self, block_size):
        self.bs = block_size
        self.kv = {}
        self.steps = []

    def ident(self, seq, p):
        return (seq.video_key, seq.position_key(p), p)

    def copy_blocks(self, pairs):
        for s, d in pairs:
            for o in range(self.bs):
                if s * self.bs + o in self.kv:
                    self.kv[d * self.bs + o] = self.kv[s * self.bs + o]

    def slot(self, seq, p):
        return seq.block_table[p // self.bs] * self.bs + p % self.bs

    def run(self, items):
        self.steps.append([(s.seq_id, n) for s, n in items])
        for seq, n in items:
            start = seq.num_computed_tokens
            for p in range(start):
                assert self.kv.get(self.slot(seq, p)) == self.ident(seq, p), f"{seq}: stale KV at {p}"
            for p in range(start, start + n):
                self.kv[self.slot(seq, p)] = self.ident(seq, p)


def next_token(seq):
    return (sum(seq.token_ids[-3:]) * 31 + seq.num_tokens) % 97 + 3


def new_seq(prompt_len, max_new, base=0, video=0, key="v"):
    ve = torch.zeros(video, 2) if video else None
    return Sequence([(base + 7 * i) % 90 + 3 for i in range(prompt_len)],
                    SamplingParams(max_new_tokens=max_new), video_embeds=ve, video_key=key if video else "")


def step(sched, runner):
    batch = sched.schedule()
    assert batch.num_tokens <= sched.max_num_batched_tokens
    assert len(batch.items) <= sched.max_num_seqs
    assert len({s.seq_id for s, _ in batch.items}) == len(batch.items)
    runner.copy_blocks(batch.copies)
    if batch:
        runner.run(batch.items)
    finished = []
    for seq in sched.update(batch):
        seq.append_token(next_token(seq))
        if seq.num_output_tokens >= seq.params.max_new_tokens:
            sched.finish(seq, "length")
            finished.append(seq)
    return batch, finished


def run_all(sched, runner, max_steps=2000):
    done = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return done
        done += step(sched, runner)[1]
    raise AssertionError("scheduler did not finish")


def make_sched(num_blocks=64, bs=4, max_seqs=8, budget=32, threshold=None):
    bm = BlockManager(num_blocks, bs)
    return (Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget, long_prefill_token_threshold=threshold),
            KVCheckingRunner(bs), bm)


def assert_no_leak(bm):
    bm.check()
    assert bm.stats()["used_blocks"] == 0 and bm.num_free_blocks == bm.num_blocks


def reference_outputs(specs):
    """Outputs of each request run alone with a big pool."""
    outs = []
    for spec in specs:
        sched, runner, bm = make_sched(num_blocks=256, budget=512)
        s = new_seq(*spec)
        sched.add(s)
        run_all(sched, runner)
        outs.append(s.output_token_ids)
    return outs


@pytest.mark.parametrize("budget", [1, 5, 16, 64])
@pytest.mark.parametrize("max_seqs", [1, 3, 8])
def test_budget_and_max_seqs_respected_and_outputs_unchanged(budget, max_seqs):
    specs = [(5, 4, 0), (23, 3, 1), (1, 6, 2), (16, 2, 3), (9, 5, 4)]
    sched, runner, bm = make_sched(budget=budget, max_seqs=max_seqs)
    seqs = [new_seq(*s) for s in specs]
    for s in seqs:
        sched.add(s)
    run_all(sched, runner)
    assert [s.output_token_ids for s in seqs] == reference_outputs(specs)
    assert all(s.finish_reason == "length" and s.is_finished for s in seqs)
    assert_no_leak(bm)


def test_chunked_prefill_splits_a_long_prompt():
    sched, runner, bm = make_sched(budget=16)
    s = new_seq(50, 2)
    sched.add(s)
    chunks = []
    while s.num_output_tokens == 0:
        batch, _ = step(sched, runner)
        chunks.append(batch.items[0][1])
    assert chunks == [16, 16, 16, 2]
    run_all(sched, runner)
    assert_no_leak(bm)


def test_decodes_and_prefill_chunks_share_a_step():
    sched, runner, bm = make_sched(budget=10)
    a = new_seq(3, 20)
    sched.add(a)
    step(sched, runner)  # a prefilled, sampled its first token
    b = new_seq(30, 2)
    sched.add(b)
    batch, _ = step(sched, runner)
    assert [(s.seq_id, n) for s, n in batch.items] == [(a.seq_id, 1), (b.seq_id, 9)]
    run_all(sched, runner)
    assert_no_leak(bm)


@pytest.mark.parametrize("num_blocks", [8, 10, 13])
def test_preemption_when_blocks_run_out_then_completion(num_blocks):
    specs = [(6, 20, 0), (5, 22, 1), (7, 18, 2), (4, 25, 3)]
    sched, runner, bm = make_sched(num_blocks=num_blocks, bs=4, budget=64)
    seqs = [new_seq(*s) for s in specs]
    for s in seqs:
        sched.add(s)
    run_all(sched, runner)
    assert sched.num_preemptions > 0
    assert any(s.num_preemptions for s in seqs)
    assert [s.output_token_ids for s in seqs] == reference_outputs(specs)
    assert_no_leak(bm)


def test_preempted_sequence_goes_back_to_the_front():
    sched, runner, bm = make_sched(num_blocks=6, bs=4, budget=64)
    a, b, c = new_seq(7, 12, 0), new_seq(7, 12, 1), new_seq(3, 2, 2)
    for s in (a, b):
        sched.add(s)
    preempted = None
    while preempted is None:
        batch, _ = step(sched, runner)
        if batch.preempted:
            preempted = batch.preempted[0]
    assert preempted is b and b.status == SequenceStatus.WAITING and b.block_table == []
    sched.add(c)
    assert sched.waiting[0] is b
    run_all(sched, runner)
    assert_no_leak(bm)


def test_request_that_can_never_fit_is_rejected():
    sched, runner, bm = make_sched(num_blocks=4, bs=4)
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add(new_seq(10, 10))


@pytest.mark.parametrize("state", ["waiting", "prefill", "decode", "preempted", "finished"])
def test_abort_in_every_state(state):
    sched, runner, bm = make_sched(num_blocks=6, bs=4, budget=8)
    victim, other = new_seq(12, 10, 0), new_seq(5, 12, 1)
    if state == "preempted":
        victim, other = new_seq(5, 12, 1), new_seq(7, 12, 0)
        sched.add(other)
        sched.add(victim)
        while not victim.num_preemptions:
            step(sched, runner)
        assert victim.status == SequenceStatus.WAITING
    else:
        sched.add(victim)
        sched.add(other)
    if state == "prefill":
        step(sched, runner)
        assert victim.status == SequenceStatus.RUNNING and victim.is_prefill and victim.num_computed_tokens == 8
    elif state == "decode":
        while victim.num_output_tokens < 2:
            step(sched, runner)
    elif state == "finished":
        run_all(sched, runner)
    got = sched.abort(victim.seq_id)
    if state == "finished":
        assert got is None and victim.finish_reason == "length"
    else:
        assert got is victim and victim.finish_reason == "abort" and victim.block_table == []
    run_all(sched, runner)
    assert other.finish_reason == "length"
    assert_no_leak(bm)


def test_long_request_not_starved_by_stream_of_short_ones():
    sched, runner, bm = make_sched(num_blocks=40, bs=4, budget=8, max_seqs=4)
    long = new_seq(60, 4, 99)
    sched.add(long)
    shorts = []
    for i in range(200):
        s = new_seq(3, 2, i)
        shorts.append(s)
        sched.add(s)
        step(sched, runner)
        if long.is_finished:
            break
    assert long.is_finished, "the long request starved"
    assert i < 60  # needs ~60/8 prefill steps + 4 decodes; generous bound
    run_all(sched, runner)
    assert all(s.is_finished for s in shorts)
    assert_no_leak(bm)


def test_waiting_head_is_never_overtaken():
    sched, runner, bm = make_sched(num_blocks=10, bs=4, budget=64, max_seqs=8)
    hog = new_seq(20, 15, 0)  # holds 5 blocks, grows
    sched.add(hog)
    step(sched, runner)
    big, small = new_seq(24, 2, 1), new_seq(2, 2, 2)  # big needs 6 blocks: must wait for hog
    sched.add(big)
    sched.add(small)
    order = []
    while sched.has_unfinished():
        for s, _ in step(sched, runner)[0].items:
            if s.seq_id not in order:
                order.append(s.seq_id)
    assert order.index(big.seq_id) < order.index(small.seq_id)
    assert_no_leak(bm)


def test_bad_scheduler_limits():
    bm = BlockManager(4, 4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(bm, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(bm, max_num_batched_tokens=0)


def with_priority(seq, priority):
    seq.priority = priority
    return seq


def first_scheduled_order(sched, runner):
    order = []
    while sched.has_unfinished():
        for s, _ in step(sched, runner)[0].items:
            if s.seq_id not in order:
                order.append(s.seq_id)
    return order


@pytest.mark.parametrize("max_seqs", [1, 8])
def test_waiting_queue_runs_by_priority_then_arrival(max_seqs):
    sched, runner, bm = make_sched(num_blocks=64, bs=4, budget=64, max_seqs=max_seqs)
    first = new_seq(30, 3, 0)  # admitted alone first
    sched.add(first)
    step(sched, runner)
    blocker = with_priority(new_seq(200, 3, 9), 0)  # holds most of the pool while it runs
    rest = [with_priority(new_seq(4, 3, i), p) for i, p in enumerate([5, 1, 1, -2, 5])]
    if max_seqs == 1:
        blocker = None
    else:
        sched.add(blocker)
    for s in rest:
        sched.add(s)
    order = first_scheduled_order(sched, runner)
    ids = {s.seq_id: i for i, s in enumerate(rest)}
    got = [ids[i] for i in order if i in ids]
    assert got == [3, 1, 2, 0, 4]  # priority -2, then 1, 1 (arrival), then 5, 5 (arrival)
    assert_no_leak(bm)


def test_higher_priority_preempts_lower_ones_for_blocks_and_outputs_stay_the_same():
    specs = [(12, 20, 0), (12, 20, 1), (12, 6, 2)]
    sched, runner, bm = make_sched(num_blocks=10, bs=4, budget=64)
    low1, low2, urgent = [new_seq(*s) for s in specs]
    for s in (low1, low2):
        sched.add(with_priority(s, 1))
    for _ in range(4):
        step(sched, runner)
    assert low1.status == low2.status == SequenceStatus.RUNNING
    sched.add(with_priority(urgent, 0))  # 3 blocks: 2 free while the low ones hold 4 each
    batch, _ = step(sched, runner)
    assert batch.preempted == [low2]  # the newest of the lowest priority goes first
    assert urgent in [s for s, _ in batch.items] and low1.status == SequenceStatus.RUNNING
    finished = run_all(sched, runner)
    assert finished.index(urgent) < finished.index(low2)
    assert [s.output_token_ids for s in (low1, low2, urgent)] == reference_outputs(specs)
    assert_no_leak(bm)


def test_higher_priority_takes_a_seat_when_max_num_seqs_is_reached():
    sched, runner, bm = make_sched(num_blocks=64, bs=4, budget=64, max_seqs=2)
    a, b, c, d = (with_priority(new_seq(4, 10, i), p) for i, p in enumerate([3, 3, 0, 3]))
    for s in (a, b):
        sched.add(s)
    step(sched, runner)
    sched.add(d)  # same priority as the running ones: waits for a seat
    step(sched, runner)
    assert d.status == SequenceStatus.WAITING and sched.num_preemptions == 0
    sched.add(c)  # higher: takes b's seat (the newest), then d still waits behind b
    batch, _ = step(sched, runner)
    assert batch.preempted == [b] and c.status == SequenceStatus.RUNNING
    assert [s.seq_id for s in sched.waiting] == [b.seq_id, d.seq_id]
    run_all(sched, runner)
    assert all(s.num_output_tokens == 10 for s in (a, b, c, d))
    assert_no_leak(bm)


def test_bad_priority():
    with pytest.raises(ValueError, match="priority must be an int"):
        Sequence([1, 2], SamplingParams(), priority=1.5)


def test_a_short_request_starts_beside_a_long_prefill():
    """A 200-token prompt with a budget of 32: a 6-token request arriving after its first chunk
    waited for all 7 chunks; with a threshold of 16 the long chunk shrinks while the short one
    waits, the short one is prefilled in the next step, and the long one has the whole budget
    again once nothing waits. Outputs as run alone."""
    specs = [(200, 3, 0), (6, 3, 1)]
    first_token_step = {}
    for threshold in (None, 16):
        sched, runner, bm = make_sched(num_blocks=128, budget=32, threshold=threshold)
        long, short = new_seq(*specs[0]), new_seq(*specs[1])
        sched.add(long)
        batch, _ = step(sched, runner)
        assert batch.items == [(long, 32)]  # alone: the whole budget
        sched.add(short)
        sizes = []
        for i in range(1, 40):
            batch, _ = step(sched, runner)
            sizes.append(dict((s.seq_id, n) for s, n in batch.items))
            if short.num_output_tokens:
                first_token_step.setdefault(threshold, i)
        run_all(sched, runner)
        assert [long.output_token_ids, short.output_token_ids] == reference_outputs(specs)
        assert_no_leak(bm)
        if threshold:
            assert sizes[0] == {long.seq_id: 16, short.seq_id: 6}  # capped while the short one waited
            assert sizes[1][long.seq_id] == 31  # then the budget minus the short one's decode
    assert first_token_step[16] == 1 and first_token_step[None] == 6  # beside the long one's last chunk


@pytest.mark.parametrize("blocker", ["max_num_seqs", "blocks"])
def test_no_cap_while_the_waiting_head_cannot_be_admitted(blocker):
    """The cap is for letting the head start: when it has no slot or no blocks, the running
    prefill keeps the whole budget."""
    sched, runner, bm = make_sched(num_blocks=59 if blocker == "blocks" else 128, budget=32, threshold=8,
                                   max_seqs=1 if blocker == "max_num_seqs" else 8)
    long = new_seq(200, 2, 0)
    sched.add(long)
    step(sched, runner)
    sched.add(new_seq(40, 2, 1))  # 10 blocks: more than the 9 the long one leaves free
    batch, _ = step(sched, runner)
    assert batch.items == [(long, 32)]


def test_the_cap_applies_to_an_admitted_prefill_while_others_wait():
    """Two long prompts arriving together: the first is admitted with the cap (the second could
    be admitted too), the second takes the rest of the budget."""
    sched, runner, bm = make_sched(num_blocks=256, budget=32, threshold=12)
    a, b = new_seq(100, 2, 0), new_seq(100, 2, 1)
    sched.add(a)
    sched.add(b)
    batch, _ = step(sched, runner)
    assert batch.items == [(a, 12), (b, 20)]
