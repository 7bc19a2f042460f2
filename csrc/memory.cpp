// The memory of the large arrays the kernels return (new_f32): blocks of whole 2 MB huge pages,
// kept for reuse when their array is freed.
//
// A training step allocates and frees the same activation and gradient arrays every time (1-34 MB
// each at batch 128). From glibc's heap they are 4 KB pages, and a step's 250 MB working set
// then misses the TLB on nearly every new page: an α=1 step at batch 128 ran 4-6% slower than with
// glibc's own huge-page option (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, which only works when set
// before the process starts). Here each array of at least kPoolMin bytes gets a 2 MB-aligned
// mapping the kernel is asked to back with transparent huge pages (madvise MADV_HUGEPAGE), and a
// freed one goes to a cache of free blocks that the next request of about its size takes back:
// no system call and no page fault after the first step. The cache is bounded (kCacheLimit);
// beyond it a freed block is unmapped. Off under AddressSanitizer (its checks need the heap) and
// with MBNET_NO_POOL=1; then new_f32 is a plain NumPy array.
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

#include "common.h"

namespace mbnet {
namespace {

constexpr std::size_t kHugePage = std::size_t(2) << 20;
constexpr std::size_t kPoolMin = std::size_t(1) << 20;      // smaller arrays: NumPy's allocator
constexpr std::size_t kCacheLimit = std::size_t(2) << 30;   // free bytes kept for reuse

struct Pool {
    std::mutex lock;
    std::multimap<std::size_t, void*> free;        // size -> free block
    std::unordered_map<void*, std::size_t> live;   // block -> size
    std::size_t cached = 0;
};

Pool& pool() {
    static Pool* p = new Pool;  // never destroyed: arrays may outlive the module's teardown
    return *p;
}

bool pool_wanted() {
#if defined(__linux__) && !defined(__SANITIZE_ADDRESS__) && defined(MADV_HUGEPAGE)
    const char* off = std::getenv("MBNET_NO_POOL");
    return !(off && *off && std::string(off) != "0");
#else
    return false;
#endif
}

// A new 2 MB-aligned mapping of `size` bytes (a multiple of kHugePage), huge pages asked for.
void* map_block(std::size_t size) {
    void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) throw std::bad_alloc();
    const auto start = reinterpret_cast<std::uintptr_t>(raw);
    const auto aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
    if (aligned > start) munmap(raw, aligned - start);
    if (aligned + size < start + size + kHugePage)
        munmap(reinterpret_cast<void*>(aligned + size), start + size + kHugePage - aligned - size);
    void* p = reinterpret_cast<void*>(aligned);
    madvise(p, size, MADV_HUGEPAGE);  // a hint: without THP the block is plain pages
    return p;
}

void release(void* p) {
    Pool& P = pool();
    std::size_t size;
    {
        std::lock_guard<std::mutex> g(P.lock);
        auto it = P.live.find(p);
        if (it == P.live.end()) return;
        size = it->second;
        P.live.erase(it);
        if (P.cached + size <= kCacheLimit) {
            P.free.emplace(size, p);
            P.cached += size;
            return;
        }
    }
    munmap(p, size);
}

}  // namespace

static const bool kPoolOn = pool_wanted();

py::array_t<float> pooled_f32(const std::vector<py::ssize_t>& shape, std::size_t bytes) {
    const std::size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    Pool& P = pool();
    void* p = nullptr;
    {
        std::lock_guard<std::mutex> g(P.lock);
        // The smallest free block that fits, if it wastes at most a quarter of the request.
        auto it = P.free.lower_bound(size);
        if (it != P.free.end() && it->first <= size + size / 4) {
            p = it->second;
            P.cached -= it->first;
            P.live.emplace(p, it->first);
            P.free.erase(it);
        }
    }
    if (!p) {
        p = map_block(size);
        std::lock_guard<std::mutex> g(P.lock);
        P.live.emplace(p, size);
    }
    py::capsule owner(p, [](void* q) { release(q); });
    return py::array_t<float>(shape, static_cast<float*>(p), owner);
}

bool use_pool(std::size_t bytes) { return kPoolOn && bytes >= kPoolMin; }

py::dict pool_stats() {
    Pool& P = pool();
    std::lock_guard<std::mutex> g(P.lock);
    std::size_t live = 0;
    for (const auto& kv : P.live) live += kv.second;
    py::dict d;
    d["enabled"] = kPoolOn;
    d["min_bytes"] = kPoolMin;
    d["live_bytes"] = live;
    d["cached_bytes"] = P.cached;
    d["cached_blocks"] = P.free.size();
    return d;
}

void pool_trim() {
    Pool& P = pool();
    std::lock_guard<std::mutex> g(P.lock);
    for (const auto& kv : P.free) munmap(kv.second, kv.first);
    P.free.clear();
    P.cached = 0;
}

}  // namespace mbnet
