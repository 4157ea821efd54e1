"""BlockManager over the C++ BlockAllocator: prefix hits, shared-video hits, fork/copy-on-write,
eviction, and no leaks (allocator.check() and every block free at the end)."""
import pytest
import torch

from stllm_engine.engine.block_manager import BlockManager
from stllm_engine.engine.sequence import Sequence
from stllm_engine.sampling_params import SamplingParams


def make(prompt_len, video=0, key="vid-a|q", base=100, max_new=8):
    ve = torch.zeros(video, 4) if video else None
    return Sequence([base + i for i in range(prompt_len)], SamplingParams(max_new_tokens=max_new),
                    video_embeds=ve, video_key=key if video else "")


def compute_all(bm, seq):
    seq.num_computed_tokens = seq.num_tokens
    bm.publish(seq)


def assert_clean(bm):
    bm.check()
    s = bm.stats()
    assert s["used_blocks"] == 0 and bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("bs", [1, 4, 8, 16])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17, 40])
def test_repeated_prompt_hits_all_but_last_token_block(bs, n):
    bm = BlockManager(64, bs)
    a = make(n)
    bm.allocate(a)
    assert a.num_computed_tokens == 0 and len(a.block_table) == -(-n // bs)
    compute_all(bm, a)
    bm.free(a)
    b = make(n)
    bm.allocate(b)
    hit_blocks = (n - 1) // bs
    assert b.num_computed_tokens == b.num_cached_tokens == hit_blocks * bs
    assert b.num_computed_tokens < b.num_tokens  # the last token is always recomputed
    assert bm.stats()["prefix_hit_tokens"] == hit_blocks * bs
    bm.free(b)
    assert_clean(bm)


def test_hits_while_the_first_sequence_is_alive_share_blocks():
    bm = BlockManager(32, 4)
    a, b = make(13), make(13)
    bm.allocate(a)
    compute_all(bm, a)
    bm.allocate(b)
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert all(bm.allocator.refcount(x) == 2 for x in a.block_table[:3])
    bm.free(a)
    bm.free(b)
    assert_clean(bm)


def test_uncomputed_blocks_are_not_published():
    bm = BlockManager(32, 4)
    a = make(16)
    bm.allocate(a)
    a.num_computed_tokens = 6  # chunked prefill half-way: only block 0 is computed
    bm.publish(a)
    b = make(16)
    bm.allocate(b)
    assert b.num_computed_tokens == 4
    for s in (a, b):
        bm.free(s)
    assert_clean(bm)


@pytest.mark.parametrize("bs", [4, 8])
def test_shared_video_hits_and_different_video_misses(bs):
    bm = BlockManager(64, bs)
    a = make(10, video=12, key="hashA|0,1,2|eva/all|float32|q=what")
    bm.allocate(a)
    compute_all(bm, a)
    same = make(10, video=12, key="hashA|0,1,2|eva/all|float32|q=what")
    other_video = make(10, video=12, key="hashB|0,1,2|eva/all|float32|q=what")
    other_text = make(10, video=12, key="hashA|0,1,2|eva/all|float32|q=what", base=300)
    bm.allocate(same)
    bm.allocate(other_video)
    bm.allocate(other_text)
    assert same.num_computed_tokens == ((22 - 1) // bs) * bs
    assert other_video.num_computed_tokens == 0
    assert other_text.num_computed_tokens == (12 // bs) * bs  # blocks holding only video tokens
    for s in (a, same, other_video, other_text):
        bm.free(s)
    assert_clean(bm)


def test_outputs_extend_the_prefix_for_the_next_turn():
    bm = BlockManager(32, 4)
    a = make(6)
    bm.allocate(a)
    compute_all(bm, a)
    for t in (7, 8, 9, 10, 11):  # decode: each new token gets a slot, then its KV is computed
        a.append_token(t)
        bm.append_slot(a)
        compute_all(bm, a)
    turn2 = Sequence(a.prompt_token_ids + a.output_token_ids + [50, 51, 52], SamplingParams())
    bm.free(a)
    bm.allocate(turn2)
    assert turn2.num_computed_tokens == 8  # 11 known tokens -> two full blocks reused
    bm.free(turn2)
    assert_clean(bm)


def test_fork_and_copy_on_write():
    bm = BlockManager(16, 4)
    p = make(10)
    bm.allocate(p)
    compute_all(bm, p)
    c = Sequence(p.prompt_token_ids, p.params)
    bm.fork(p, c)
    assert c.block_table == p.block_table and c.num_computed_tokens == p.num_computed_tokens
    assert all(bm.allocator.refcount(b) == 2 for b in p.block_table)
    last = p.block_table[-1]
    c.append_token(5)
    copies = bm.append_slot(c)  # position 10 lies in the shared partial block 2
    assert copies == [(last, c.block_table[-1])] and c.block_table[-1] != last
    assert c.block_table[:2] == p.block_table[:2]
    p.append_token(6)
    assert bm.append_slot(p) == []  # parent now owns its last block alone
    for s in (p, c):
        s.append_token(1)
        s.append_token(2)  # position 12: a new block, no copy
        assert bm.append_slot(s) == []
    bm.free(p)
    bm.free(c)
    assert_clean(bm)
    assert bm.stats()["cow_copies"] == 1


def test_can_allocate_and_can_append_limits():
    bm = BlockManager(3, 4)
    big = make(13)  # 4 blocks
    assert not bm.can_allocate(big)
    with pytest.raises(RuntimeError, match="blocks"):
        bm.allocate(big)
    a = make(12)
    bm.allocate(a)
    assert bm.num_free_blocks == 0
    a.num_computed_tokens = 12
    a.append_token(1)
    assert not bm.can_append(a)
    bm.free(a)
    assert_clean(bm)


def test_cached_blocks_are_evicted_when_needed():
    bm = BlockManager(4, 4)
    a = make(9)
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    assert bm.stats()["cached_blocks"] == 2
    filler = make(16, base=500)
    bm.allocate(filler)  # needs all 4 blocks: both cached ones are evicted
    assert bm.stats()["evictions"] == 2
    bm.free(filler)
    b = make(9)
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    bm.free(b)
    assert_clean(bm)


def test_prefix_caching_off():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    a = make(9)
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    b = make(9)
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    bm.free(b)
    assert_clean(bm)


@pytest.mark.parametrize("kw", [dict(num_blocks=0, block_size=4), dict(num_blocks=4, block_size=0)])
def test_bad_sizes(kw):
    with pytest.raises(ValueError):
        BlockManager(**kw)


@pytest.mark.parametrize("video,bs", [(0, 4), (5, 4), (8, 4), (3, 8), (12, 4)])
def test_block_content_per_position(video, bs):
    bm = BlockManager(8, bs)
    s = make(9, video=video)
    s.append_token(77)
    for i in range(s.num_tokens // bs):
        content = bm.block_content(s, i)
        assert len(content) == bs
        for o, k in enumerate(content):
            p = i * bs + o
            if p < video:
                assert k < 0  # video marker
            else:
                assert k == s.token_ids[p - video]
    other = make(9, video=video, key="another video")
    other.append_token(77)
    if video >= bs:
        assert bm.block_content(s, 0) != bm.block_content(other, 0)
