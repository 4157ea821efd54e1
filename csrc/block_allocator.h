// Host-side KV block allocator with a prefix-hash table (no tensors).
//
// Every block is in exactly one state:
//   FREE   refcount 0, no hash, in free_            (handed out first by allocate)
//   CACHED refcount 0, holds a registered hash, in lru_ (oldest release first; evicted on demand)
//   USED   refcount > 0 (may hold a hash)
// hash_to_block_ maps a 64-bit hash to the one block holding it; a block holds a hash iff the map
// entry for that hash points back to it. The token ids of a registered block are kept so that a
// lookup hit is verified (a hash collision with other tokens is a miss).
#pragma once
#include <cstdint>
#include <deque>
#include <list>
#include <string>
#include <unordered_map>
#include <vector>

namespace stllm {

class BlockAllocator {
 public:
  explicit BlockAllocator(int64_t num_blocks);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t num_free() const { return static_cast<int64_t>(free_.size() + lru_.size()); }
  int64_t allocate();
  void incref(int64_t block);
  int64_t decref(int64_t block);
  int64_t refcount(int64_t block) const;
  void register_block(int64_t block, uint64_t hash, const std::vector<int64_t>& tokens);
  int64_t lookup(uint64_t hash, const std::vector<int64_t>& tokens);
  void check() const;

  int64_t hits() const { return hits_; }
  int64_t misses() const { return misses_; }
  int64_t evictions() const { return evictions_; }
  int64_t cached_blocks() const { return static_cast<int64_t>(lru_.size()); }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t used_blocks() const { return num_blocks_ - cached_blocks() - free_blocks(); }

 private:
  enum class State : uint8_t { kFree, kCached, kUsed };

  void check_id(int64_t block, const char* op) const;
  void drop_hash(int64_t block);

  int64_t num_blocks_;
  std::vector<int64_t> refcount_;
  std::vector<State> state_;
  std::vector<bool> has_hash_;
  std::vector<uint64_t> hash_;
  std::vector<std::vector<int64_t>> tokens_;
  std::deque<int64_t> free_;
  std::list<int64_t> lru_;                        // front = least recently released
  std::vector<std::list<int64_t>::iterator> lru_pos_;
  std::unordered_map<uint64_t, int64_t> hash_to_block_;
  int64_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

}  // namespace stllm
