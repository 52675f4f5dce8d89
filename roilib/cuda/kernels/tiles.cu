// tiles.cu: per-tile box lists for the deterministic backward passes.
//
// A gather backward must not scan every box for every pixel. The host splits each
// image into TY x TX square tiles of side ts and lists, for every tile, the boxes
// whose touched pixels (the op family's `ranges` kernel: {image, first row, last row,
// first column, last column}, image -1 for none) meet it, in box order:
//
//   1. flags: one work item per box marks flags[t * K + k] = 1 for each tile t it meets
//      (flags zeroed by the host);
//   2. the host takes an inclusive prefix sum of each tile's row of flags (cumsum);
//   3. lists: one work item per (tile, box) with its flag set writes k at position
//      cumsum - 1 of the tile's row.
//
// No thread looks at a box that cannot touch its tile, no atomics are used, and the
// order inside a list is box order, so the backward that reads it is deterministic.
// The kernels do not depend on the feature dtype; their suffix is the index type.
#include "common.cuh"

__device__ void tiles_flags(long long n, const int* __restrict__ ranges, int ts, int TY, int TX,
                            int* __restrict__ flags) {
  long long K = n;
  ROILIB_FOR_EACH(k, n) {
    const int* r = ranges + 5 * k;
    if (r[0] < 0) continue;
    for (int ty = r[1] / ts; ty <= r[2] / ts; ++ty)
      for (int tx = r[3] / ts; tx <= r[4] / ts; ++tx) flags[(((long long)r[0] * TY + ty) * TX + tx) * K + k] = 1;
  }
}

__device__ void tiles_lists(long long n, const int* __restrict__ flags, const int* __restrict__ cumsum, int K,
                            int* __restrict__ lists) {
  ROILIB_FOR_EACH(e, n) {
    if (flags[e]) lists[e - e % K + cumsum[e] - 1] = (int)(e % K);
  }
}

extern "C" __global__ void tiles_flags_i32(long long n, const int* __restrict__ ranges, int ts, int TY, int TX,
                                           int* __restrict__ flags) {
  tiles_flags(n, ranges, ts, TY, TX, flags);
}

extern "C" __global__ void tiles_lists_i32(long long n, const int* __restrict__ flags, const int* __restrict__ cumsum,
                                           int K, int* __restrict__ lists) {
  tiles_lists(n, flags, cumsum, K, lists);
}
