// BlockAllocator implementation and its Python binding (see block_allocator.h for the states).
#include "block_allocator.h"

#include <stdexcept>
#include <torch/extension.h>

#include "ops.h"

namespace stllm {

namespace {
[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error("BlockAllocator: " + msg); }
}  // namespace

BlockAllocator::BlockAllocator(int64_t num_blocks)
    : num_blocks_(num_blocks),
      refcount_(num_blocks > 0 ? num_blocks : 0, 0),
      state_(num_blocks > 0 ? num_blocks : 0, State::kFree),
      has_hash_(num_blocks > 0 ? num_blocks : 0, false),
      hash_(num_blocks > 0 ? num_blocks : 0, 0),
      tokens_(num_blocks > 0 ? num_blocks : 0),
      lru_pos_(num_blocks > 0 ? num_blocks : 0) {
  if (num_blocks <= 0) {
    throw std::invalid_argument("BlockAllocator: num_blocks must be positive, got " + std::to_string(num_blocks));
  }
  for (int64_t b = 0; b < num_blocks; ++b) free_.push_back(b);
}

void BlockAllocator::check_id(int64_t block, const char* op) const {
  if (block < 0 || block >= num_blocks_) {
    throw std::out_of_range(std::string("BlockAllocator.") + op + ": block id " + std::to_string(block) +
                            " out of range [0, " + std::to_string(num_blocks_) + ")");
  }
}

void BlockAllocator::drop_hash(int64_t block) {
  if (!has_hash_[block]) return;
  auto it = hash_to_block_.find(hash_[block]);
  if (it != hash_to_block_.end() && it->second == block) hash_to_block_.erase(it);
  has_hash_[block] = false;
  tokens_[block].clear();
  tokens_[block].shrink_to_fit();
}

int64_t BlockAllocator::allocate() {
  int64_t b;
  if (!free_.empty()) {
    b = free_.front();
    free_.pop_front();
  } else if (!lru_.empty()) {
    b = lru_.front();
    lru_.pop_front();
    drop_hash(b);
    ++evictions_;
  } else {
    fail("out of KV blocks (all " + std::to_string(num_blocks_) + " blocks are in use)");
  }
  state_[b] = State::kUsed;
  refcount_[b] = 1;
  return b;
}

void BlockAllocator::incref(int64_t block) {
  check_id(block, "incref");
  if (state_[block] == State::kFree) fail("incref of block " + std::to_string(block) + " which is free");
  if (state_[block] == State::kCached) {
    lru_.erase(lru_pos_[block]);
    state_[block] = State::kUsed;
  }
  ++refcount_[block];
}

int64_t BlockAllocator::decref(int64_t block) {
  check_id(block, "decref");
  if (refcount_[block] <= 0) fail("double free of block " + std::to_string(block));
  if (--refcount_[block] == 0) {
    if (has_hash_[block]) {
      state_[block] = State::kCached;
      lru_pos_[block] = lru_.insert(lru_.end(), block);
    } else {
      state_[block] = State::kFree;
      free_.push_back(block);
    }
  }
  return refcount_[block];
}

int64_t BlockAllocator::refcount(int64_t block) const {
  check_id(block, "refcount");
  return refcount_[block];
}

void BlockAllocator::register_block(int64_t block, uint64_t hash, const std::vector<int64_t>& tokens) {
  check_id(block, "register");
  if (state_[block] != State::kUsed) fail("register of block " + std::to_string(block) + " which is not in use");
  auto it = hash_to_block_.find(hash);
  if (it != hash_to_block_.end()) {
    if (it->second == block) {  // re-register: refresh the content
      tokens_[block] = tokens;
      return;
    }
    return;  // another block already publishes this hash: keep it, this block stays unpublished
  }
  drop_hash(block);
  has_hash_[block] = true;
  hash_[block] = hash;
  tokens_[block] = tokens;
  hash_to_block_.emplace(hash, block);
}

int64_t BlockAllocator::lookup(uint64_t hash, const std::vector<int64_t>& tokens) {
  auto it = hash_to_block_.find(hash);
  if (it == hash_to_block_.end() || tokens_[it->second] != tokens) {
    ++misses_;
    return -1;
  }
  const int64_t b = it->second;
  if (state_[b] == State::kCached) {
    lru_.erase(lru_pos_[b]);
    state_[b] = State::kUsed;
  }
  ++refcount_[b];
  ++hits_;
  return b;
}

void BlockAllocator::check() const {
  std::vector<int> seen(num_blocks_, 0);
  for (int64_t b : free_) {
    if (b < 0 || b >= num_blocks_) fail("free list holds bad id " + std::to_string(b));
    if (seen[b]++) fail("block " + std::to_string(b) + " appears twice in the free list");
    if (state_[b] != State::kFree) fail("block " + std::to_string(b) + " in the free list but not free");
  }
  for (auto it = lru_.begin(); it != lru_.end(); ++it) {
    const int64_t b = *it;
    if (b < 0 || b >= num_blocks_) fail("LRU holds bad id " + std::to_string(b));
    if (seen[b]++) fail("block " + std::to_string(b) + " appears twice in free list/LRU");
    if (state_[b] != State::kCached) fail("block " + std::to_string(b) + " in the LRU but not cached");
    if (lru_pos_[b] != it) fail("stale LRU position of block " + std::to_string(b));
  }
  for (int64_t b = 0; b < num_blocks_; ++b) {
    const std::string id = "block " + std::to_string(b);
    switch (state_[b]) {
      case State::kFree:
        if (refcount_[b] != 0) fail(id + " is free with refcount " + std::to_string(refcount_[b]));
        if (has_hash_[b]) fail(id + " is free but holds a hash");
        if (seen[b] != 1) fail(id + " is free but not in the free list");
        break;
      case State::kCached:
        if (refcount_[b] != 0) fail(id + " is cached with refcount " + std::to_string(refcount_[b]));
        if (!has_hash_[b]) fail(id + " is cached without a hash");
        if (seen[b] != 1) fail(id + " is cached but not in the LRU");
        break;
      case State::kUsed:
        if (refcount_[b] <= 0) fail(id + " is used with refcount " + std::to_string(refcount_[b]));
        if (seen[b] != 0) fail(id + " is used but sits in the free list/LRU");
        break;
    }
    if (has_hash_[b]) {
      auto it = hash_to_block_.find(hash_[b]);
      if (it == hash_to_block_.end() || it->second != b) fail(id + " holds a hash the table does not map to it");
    }
  }
  for (const auto& [h, b] : hash_to_block_) {
    if (b < 0 || b >= num_blocks_) fail("hash table points to bad id " + std::to_string(b));
    if (!has_hash_[b] || hash_[b] != h) fail("hash table entry for block " + std::to_string(b) + " does not match its stored hash");
  }
}

void register_block_allocator(pybind11::module_& m) {
  namespace py = pybind11;
  // Python ints of either sign are taken modulo 2**64 (e.g. the result of hash()).
  auto to_u64 = [](const py::int_& h) {
    unsigned long long v = PyLong_AsUnsignedLongLongMask(h.ptr());
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw py::error_already_set();
    return static_cast<uint64_t>(v);
  };
  py::class_<BlockAllocator>(m, "BlockAllocator",
                             "KV block allocator: free list, refcounts, LRU of released hashed blocks, "
                             "prefix-hash table with content-verified lookups.")
      .def(py::init<int64_t>(), py::arg("num_blocks"))
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def("num_free", &BlockAllocator::num_free, "Blocks allocatable now (free + cached with refcount 0).")
      .def("allocate", &BlockAllocator::allocate,
           "Block with refcount 1: a free one, else evicts the least recently released cached block.")
      .def("incref", &BlockAllocator::incref, py::arg("block"))
      .def("decref", &BlockAllocator::decref, py::arg("block"),
           "Drop one reference; at 0 the block is cached (if it holds a hash) or freed. Returns the new count.")
      .def("refcount", &BlockAllocator::refcount, py::arg("block"))
      .def("register",
           [to_u64](BlockAllocator& a, int64_t b, const py::int_& h, const std::vector<int64_t>& t) {
             a.register_block(b, to_u64(h), t);
           },
           py::arg("block"), py::arg("hash"), py::arg("tokens"),
           "Publish a full in-use block's content under a 64-bit hash (no-op if another block holds it).")
      .def("lookup",
           [to_u64](BlockAllocator& a, const py::int_& h, const std::vector<int64_t>& t) {
             return a.lookup(to_u64(h), t);
           },
           py::arg("hash"), py::arg("tokens"),
           "Block holding this hash and exactly these tokens, incref'd (revived if cached); -1 on a miss.")
      .def("stats",
           [](const BlockAllocator& a) {
             py::dict d;
             d["hits"] = a.hits();
             d["misses"] = a.misses();
             d["evictions"] = a.evictions();
             d["cached_blocks"] = a.cached_blocks();
             d["free_blocks"] = a.free_blocks();
             d["used_blocks"] = a.used_blocks();
             return d;
           })
      .def("check", &BlockAllocator::check, "Verify every invariant; RuntimeError on a violation.")
      .def("__repr__", [](const BlockAllocator& a) {
        return "BlockAllocator(num_blocks=" + std::to_string(a.num_blocks()) + ", free=" +
               std::to_string(a.free_blocks()) + ", cached=" + std::to_string(a.cached_blocks()) +
               ", used=" + std::to_string(a.used_blocks()) + ")";
      });
}

}  // namespace stllm
