// roi_pool.cu: RoIPool (Fast R-CNN) forward and backward.
//
// The scaled box corners are C-rounded (half away from zero); the box is
// end - start + 1 pixels (at least 1); bin p spans [floor(p*bin), ceil((p+1)*bin))
// pixels from start, clipped to the map. The output is the bin's max (0 when empty)
// and the backward routes each output's gradient to that max's pixel.
#include "common.cuh"

// The rounded box of one RoI and its bin size. Kept in floating point (not int like
// torchvision) so absurd coordinates cannot overflow an int; for any box within
// 2^24 pixels the values are the same integers.
template <class A>
struct PoolBox {
  bool valid;  // roi_is_valid; an invalid box has empty bins
  int batch;
  A y0, x0;
  A bin_h, bin_w;
};

template <class A>
__device__ PoolBox<A> pool_box(const A* roi, A scale, int N, int PH, int PW) {
  PoolBox<A> b;
  b.valid = roi_is_valid(roi, N);
  if (!b.valid) {
    b.batch = 0;
    b.y0 = b.x0 = 0;
    b.bin_h = b.bin_w = 1;
    return b;
  }
  b.batch = (int)roi[0];
  b.x0 = round(roi[1] * scale);
  b.y0 = round(roi[2] * scale);
  A roi_w = round(roi[3] * scale) - b.x0 + (A)1;
  A roi_h = round(roi[4] * scale) - b.y0 + (A)1;
  b.bin_w = (roi_w < (A)1 ? (A)1 : roi_w) / (A)PW;
  b.bin_h = (roi_h < (A)1 ? (A)1 : roi_h) / (A)PH;
  return b;
}

// Pixel range [*lo, *hi) of bin p on one axis, clipped to [0, size].
template <class A>
__device__ __forceinline__ void pool_bin_range(A start, A bin, int p, int size, int* lo, int* hi) {
  *lo = clamp_to_int(floor((A)p * bin) + start, 0, size);
  *hi = clamp_to_int(ceil((A)(p + 1) * bin) + start, 0, size);
}

// Max of bin (ph, pw) of box b; *arg = h * W + w of its pixel, -1 when empty.
template <class T, class A>
__device__ __forceinline__ A pool_bin_max(const T* __restrict__ plane, int H, int W, const PoolBox<A>& b, int ph,
                                          int pw, int* arg) {
  int h0, h1, w0, w1;
  pool_bin_range(b.y0, b.bin_h, ph, H, &h0, &h1);
  pool_bin_range(b.x0, b.bin_w, pw, W, &w0, &w1);
  return window_max<T, A>(plane, W, h0, h1, w0, w1, arg);
}

// Forward: one work item per output element (k, c, ph, pw). Writes every element.
template <class T, class A>
__device__ void roi_pool_forward(long long n, const T* __restrict__ input, const A* __restrict__ rois, int N, int C,
                                 int H, int W, int PH, int PW, A scale, T* __restrict__ output) {
  ROILIB_FOR_EACH(i, n) {
    OutIndex o = out_index(i, C, PH, PW);
    PoolBox<A> b = pool_box(rois + 5 * o.k, scale, N, PH, PW);
    if (!b.valid) {
      store(output + i, nan_of(A()));
      continue;
    }
    int arg;
    store(output + i, pool_bin_max(input + ((long long)b.batch * C + o.c) * H * W, H, W, b, o.ph, o.pw, &arg));
  }
}

// First pass of the deterministic backward: each output's argmax (h * W + w, or -1).
template <class T, class A>
__device__ void roi_pool_argmax(long long n, const T* __restrict__ input, const A* __restrict__ rois, int N, int C,
                                int H, int W, int PH, int PW, A scale, int* __restrict__ argmax) {
  ROILIB_FOR_EACH(i, n) {
    OutIndex o = out_index(i, C, PH, PW);
    PoolBox<A> b = pool_box(rois + 5 * o.k, scale, N, PH, PW);
    if (!b.valid) {
      argmax[i] = -1;
      continue;
    }
    pool_bin_max(input + ((long long)b.batch * C + o.c) * H * W, H, W, b, o.ph, o.pw, argmax + i);
  }
}

// Backward with atomics: each output adds its gradient at its argmax pixel.
// grad_input is in A and must be zeroed.
template <class T, class A>
__device__ void roi_pool_backward_atomic(long long n, const T* __restrict__ grad_output, const T* __restrict__ input,
                                         const A* __restrict__ rois, int N, int C, int H, int W, int PH, int PW,
                                         A scale, A* __restrict__ grad_input) {
  ROILIB_FOR_EACH(i, n) {
    OutIndex o = out_index(i, C, PH, PW);
    PoolBox<A> b = pool_box(rois + 5 * o.k, scale, N, PH, PW);
    if (!b.valid) continue;
    long long plane_offset = ((long long)b.batch * C + o.c) * H * W;
    int arg;
    pool_bin_max(input + plane_offset, H, W, b, o.ph, o.pw, &arg);
    if (arg >= 0) atomicAdd(grad_input + plane_offset + arg, to_acc(grad_output[i]));
  }
}

// Deterministic backward, step 1: one work item per box writes
// ranges[5k .. 5k+4] = {image, first row, last row, first column, last column} that
// its non-empty bins cover (image -1: none); tiles.cu lists the boxes per tile.
template <class A>
__device__ void roi_pool_ranges(long long n, const A* __restrict__ rois, int N, int H, int W, int PH, int PW, A scale,
                                int* __restrict__ ranges) {
  ROILIB_FOR_EACH(k, n) {
    PoolBox<A> b = pool_box(rois + 5 * k, scale, N, PH, PW);
    int* r = ranges + 5 * k;
    r[1] = H, r[2] = -1, r[3] = W, r[4] = -1;
    for (int p = 0; p < PH; ++p) {
      int lo, hi;
      pool_bin_range(b.y0, b.bin_h, p, H, &lo, &hi);
      if (lo < hi) r[1] = imin(r[1], lo), r[2] = imax(r[2], hi - 1);
    }
    for (int p = 0; p < PW; ++p) {
      int lo, hi;
      pool_bin_range(b.x0, b.bin_w, p, W, &lo, &hi);
      if (lo < hi) r[3] = imin(r[3], lo), r[4] = imax(r[4], hi - 1);
    }
    r[0] = (b.valid && r[1] <= r[2] && r[3] <= r[4]) ? b.batch : -1;
  }
}

// Deterministic backward, step 3: one work item per (image b, channel c, tile) walks
// the tile's box list (tiles.cu) in box order and, for the bins that meet the tile,
// adds each bin's gradient at its argmax when that pixel is in the tile. Same terms in
// the same order per pixel as the atomic version on the CPU; writes every element.
template <class T, class A>
__device__ void roi_pool_backward_tiles(long long n, const T* __restrict__ grad_output, const A* __restrict__ rois,
                                        const int* __restrict__ lists, const int* __restrict__ cumsum,
                                        const int* __restrict__ argmax, int K, int N, int C, int H, int W, int PH,
                                        int PW, A scale, int ts, int TY, int TX, A* __restrict__ grad_input) {
  ROILIB_FOR_EACH(i, n) {
    TileItem t = tile_item(i, C, 1, H, W, ts, TY, TX, K, cumsum);
    int c = t.c, r0 = t.r0, r1 = t.r1, c0 = t.c0, c1 = t.c1;
    A acc[ROILIB_TILE * ROILIB_TILE];
    for (int p = 0; p < ts * ts; ++p) acc[p] = 0;
    for (int j = 0; j < t.count; ++j) {
      long long k = lists[t.list0 + j];
      PoolBox<A> b = pool_box(rois + 5 * k, scale, N, PH, PW);
      long long out0 = (k * C + c) * PH * PW;
      // The columns' bins that meet the tile, found once for all rows of bins.
      int pw0 = PW, pw1 = -1;
      for (int pw = 0; pw < PW; ++pw) {
        int w0, w1;
        pool_bin_range(b.x0, b.bin_w, pw, W, &w0, &w1);
        if (w1 > c0 && w0 <= c1) pw0 = imin(pw0, pw), pw1 = pw;
      }
      for (int ph = 0; ph < PH && pw0 <= pw1; ++ph) {
        int h0, h1;
        pool_bin_range(b.y0, b.bin_h, ph, H, &h0, &h1);
        if (h1 <= r0 || h0 > r1) continue;
        for (int pw = pw0; pw <= pw1; ++pw) {
          int a = argmax[out0 + ph * PW + pw];
          if (a < 0) continue;
          int ah = a / W, aw = a % W;
          if (ah >= r0 && ah <= r1 && aw >= c0 && aw <= c1)
            acc[(ah - r0) * ts + (aw - c0)] += to_acc(grad_output[out0 + ph * PW + pw]);
        }
      }
    }
    store_tile(t, acc, ts, C, H, W, grad_input);
  }
}

#define ROI_POOL_ENTRY_POINTS(SUFFIX, T, A)                                                                           \
  extern "C" __global__ void roi_pool_forward_##SUFFIX(long long n, const T* __restrict__ input,                      \
                                                       const A* __restrict__ rois, int N, int C, int H, int W,        \
                                                       int PH, int PW, A scale, T* __restrict__ output) {             \
    roi_pool_forward<T, A>(n, input, rois, N, C, H, W, PH, PW, scale, output);                                        \
  }                                                                                                                   \
  extern "C" __global__ void roi_pool_argmax_##SUFFIX(long long n, const T* __restrict__ input,                       \
                                                      const A* __restrict__ rois, int N, int C, int H, int W, int PH, \
                                                      int PW, A scale, int* __restrict__ argmax) {                    \
    roi_pool_argmax<T, A>(n, input, rois, N, C, H, W, PH, PW, scale, argmax);                                         \
  }                                                                                                                   \
  extern "C" __global__ void roi_pool_backward_atomic_##SUFFIX(                                                       \
      long long n, const T* __restrict__ grad_output, const T* __restrict__ input, const A* __restrict__ rois, int N, \
      int C, int H, int W, int PH, int PW, A scale, A* __restrict__ grad_input) {                                     \
    roi_pool_backward_atomic<T, A>(n, grad_output, input, rois, N, C, H, W, PH, PW, scale, grad_input);               \
  }                                                                                                                   \
  extern "C" __global__ void roi_pool_ranges_##SUFFIX(long long n, const A* __restrict__ rois, int N, int H, int W,   \
                                                      int PH, int PW, A scale, int* __restrict__ ranges) {            \
    roi_pool_ranges<A>(n, rois, N, H, W, PH, PW, scale, ranges);                                                      \
  }                                                                                                                   \
  extern "C" __global__ void roi_pool_backward_tiles_##SUFFIX(                                                        \
      long long n, const T* __restrict__ grad_output, const A* __restrict__ rois, const int* __restrict__ lists,      \
      const int* __restrict__ cumsum, const int* __restrict__ argmax, int K, int N, int C, int H, int W, int PH,      \
      int PW, A scale, int ts, int TY, int TX, A* __restrict__ grad_input) {                                          \
    roi_pool_backward_tiles<T, A>(n, grad_output, rois, lists, cumsum, argmax, K, N, C, H, W, PH, PW, scale, ts, TY,  \
                                  TX, grad_input);                                                                    \
  }

ROI_POOL_ENTRY_POINTS(f16, __half, float)
ROI_POOL_ENTRY_POINTS(f32, float, float)
ROI_POOL_ENTRY_POINTS(f64, double, double)
