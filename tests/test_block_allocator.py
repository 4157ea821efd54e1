"""stllm_engine._C.BlockAllocator against a plain-Python model of its state, plus edge cases."""
import random

import pytest
import torch  # noqa: F401  (the extension needs torch loaded first)

from stllm_engine._C import BlockAllocator


class Model:
    """Expected allocator state: refcounts, free set, LRU order, hash table with contents."""

    def __init__(self, n):
        self.n = n
        self.ref = [0] * n
        self.free = set(range(n))
        self.lru = []                      # oldest release first
        self.hash_of = {}                  # block -> hash
        self.table = {}                    # hash -> (block, tokens)
        self.hits = self.misses = self.evictions = 0

    def drop_hash(self, b):
        h = self.hash_of.pop(b, None)
        if h is not None and self.table.get(h, (None,))[0] == b:
            del self.table[h]

    def allocate(self, got):
        if self.free:
            assert got in self.free, f"allocate returned {got}, expected one of the free blocks"
            self.free.discard(got)
        else:
            assert got == self.lru[0], f"allocate evicted {got}, expected oldest cached {self.lru[0]}"
            self.lru.pop(0)
            self.drop_hash(got)
            self.evictions += 1
        self.ref[got] = 1

    def decref(self, b):
        self.ref[b] -= 1
        if self.ref[b] == 0:
            (self.lru.append if b in self.hash_of else self.free.add)(b)
        return self.ref[b]

    def incref(self, b):
        if self.ref[b] == 0:
            self.lru.remove(b)
        self.ref[b] += 1

    def register(self, b, h, tokens):
        if h in self.table:
            if self.table[h][0] == b:
                self.table[h] = (b, list(tokens))
            return
        self.drop_hash(b)
        self.hash_of[b] = h
        self.table[h] = (b, list(tokens))

    def lookup(self, h, tokens):
        entry = self.table.get(h)
        if entry is None or entry[1] != list(tokens):
            self.misses += 1
            return -1
        self.incref(entry[0])
        self.hits += 1
        return entry[0]


def assert_same(a: BlockAllocator, m: Model):
    a.check()
    assert [a.refcount(b) for b in range(m.n)] == m.ref
    assert a.num_free() == len(m.free) + len(m.lru)
    used = sum(r > 0 for r in m.ref)
    assert a.stats() == dict(hits=m.hits, misses=m.misses, evictions=m.evictions,
                             cached_blocks=len(m.lru), free_blocks=len(m.free), used_blocks=used)


@pytest.mark.parametrize("num_blocks,seed", [(1, 0), (3, 1), (8, 2), (32, 3), (64, 4)])
def test_random_operations_match_model(num_blocks, seed):
    rng = random.Random(seed)
    a, m = BlockAllocator(num_blocks), Model(num_blocks)
    hashes = [rng.getrandbits(64) for _ in range(max(2, num_blocks // 2))]
    contents = {h: [rng.randrange(100) for _ in range(4)] for h in hashes}
    for _ in range(1500):
        used = [b for b in range(num_blocks) if m.ref[b] > 0]
        op = rng.choice(["alloc", "alloc", "incref", "decref", "decref", "decref", "register", "lookup"])
        if op == "alloc":
            if m.free or m.lru:
                m.allocate(a.allocate())
            else:
                with pytest.raises(RuntimeError, match="out of KV blocks"):
                    a.allocate()
        elif op == "incref" and used:
            b = rng.choice(used)
            a.incref(b)
            m.incref(b)
        elif op == "decref" and used:
            b = rng.choice(used)
            assert a.decref(b) == m.decref(b)
        elif op == "register" and used:
            b, h = rng.choice(used), rng.choice(hashes)
            a.register(b, h, contents[h])
            m.register(b, h, contents[h])
        elif op == "lookup":
            h = rng.choice(hashes)
            tokens = contents[h] if rng.random() < 0.8 else contents[h][:-1] + [contents[h][-1] + 1]
            assert a.lookup(h, tokens) == m.lookup(h, tokens)
        assert_same(a, m)
    for b in range(num_blocks):              # release everything: no leaks
        while m.ref[b] > 0:
            assert a.decref(b) == m.decref(b)
    assert_same(a, m)
    assert a.num_free() == num_blocks and a.stats()["used_blocks"] == 0
    got = sorted(a.allocate() for _ in range(num_blocks))  # every block is allocatable again
    assert got == list(range(num_blocks))
    a.check()
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        a.allocate()


def test_double_free_and_bad_ids():
    a = BlockAllocator(4)
    b = a.allocate()
    assert a.decref(b) == 0
    with pytest.raises(RuntimeError, match="double free"):
        a.decref(b)
    for bad in (-1, 4, 1 << 40):
        for call in (a.decref, a.incref, a.refcount):
            with pytest.raises(IndexError, match="out of range"):
                call(bad)
        with pytest.raises(IndexError):
            a.register(bad, 1, [1])
    with pytest.raises(RuntimeError, match="free"):
        a.incref(b)
    with pytest.raises(RuntimeError, match="not in use"):
        a.register(b, 7, [1, 2])
    a.check()


@pytest.mark.parametrize("n", [0, -3])
def test_bad_size(n):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(n)


def test_lru_evicts_oldest_release_first():
    a = BlockAllocator(4)
    blocks = [a.allocate() for _ in range(4)]
    for i, b in enumerate(blocks):
        a.register(b, 100 + i, [i])
    order = [blocks[2], blocks[0], blocks[3], blocks[1]]
    for b in order:
        a.decref(b)
    assert a.stats()["cached_blocks"] == 4 and a.num_free() == 4
    # reviving blocks[0] moves it out of the LRU; releasing it again makes it the newest
    assert a.lookup(100, [0]) == blocks[0]
    a.decref(blocks[0])
    expected = [blocks[2], blocks[3], blocks[1], blocks[0]]
    for i, want in enumerate(expected):
        assert a.allocate() == want
        assert a.stats()["evictions"] == i + 1
        a.check()
    for i in range(4):                        # every hash was dropped on eviction
        assert a.lookup(100 + i, [i]) == -1


def test_free_blocks_are_used_before_evicting():
    a = BlockAllocator(3)
    b0, b1 = a.allocate(), a.allocate()
    a.register(b0, 5, [1, 2])
    a.decref(b0)
    a.decref(b1)                              # no hash: goes back to the free list
    got = {a.allocate(), a.allocate()}
    assert b0 not in got and a.stats()["evictions"] == 0
    assert a.lookup(5, [1, 2]) == b0          # still cached, revived with refcount 1
    assert a.refcount(b0) == 1
    a.check()


def test_lookup_verifies_content():
    a = BlockAllocator(2)
    b = a.allocate()
    a.register(b, 0xDEADBEEF, [1, 2, 3])
    assert a.lookup(0xDEADBEEF, [1, 2, 4]) == -1        # same hash, other tokens: a miss
    assert a.lookup(0xDEADBEEF, [1, 2]) == -1
    assert a.lookup(0xDEADBEEF, [1, 2, 3]) == b
    assert a.refcount(b) == 2
    assert a.stats()["hits"] == 1 and a.stats()["misses"] == 2
    a.check()


def test_hash_is_taken_modulo_2_64():
    a = BlockAllocator(2)
    b = a.allocate()
    a.register(b, -5, [9])                               # e.g. Python's hash() is signed
    assert a.lookup(2**64 - 5, [9]) == b
    a.register(b, 2**64 - 1, [9])                        # re-register under another hash
    assert a.lookup(-5, [9]) == -1 and a.lookup(-1, [9]) == b
    a.check()


def test_second_block_with_a_published_hash_stays_unpublished():
    a = BlockAllocator(2)
    b0, b1 = a.allocate(), a.allocate()
    a.register(b0, 42, [7])
    a.register(b1, 42, [7])                              # computed twice: keep the first
    a.decref(b1)
    assert a.stats()["free_blocks"] == 1                 # b1 had no hash: freed, not cached
    assert a.lookup(42, [7]) == b0
    a.check()
