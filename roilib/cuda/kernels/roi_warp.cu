// roi_warp.cu: RoIWarp, the RoI warping layer of MNC (Dai, He and Sun, 2016).
//
// The rules are those of MNC's own layer (caffe-mnc, roi_warping_layer.cu), written
// here from scratch; roilib.reference.roi_warp is the NumPy twin, operation for
// operation:
//   * corners scaled and C-rounded, roi = max(end - start, 0) (no +1), bin = roi / P;
//   * per bin, samples at f = p, p + 1/g, ... while f <= p + 1 (both ends included),
//     with g = ceil(roi / P) and the steps added one at a time in A;
//   * a sample beyond half a cell outside the map is skipped; inside, RoIAlign's clamp;
//   * the output is the largest sample that beats -FLT_MAX, 0 when there is none.
// Work items are output elements (forward, argmax, atomic backward), boxes (ranges),
// (image, channel, tile) triples (the deterministic backward, over tiles.cu's box
// lists), (box, channel) pairs (box gradient) or (box, column) pairs (its reduction).
// Every loop is a grid-stride loop over long long indices. A roi row that fails
// roi_is_valid outputs NaN and routes no gradient.
#include "common.cuh"

// MNC starts each bin's maximum at -FLT_MAX: a sample has to beat it to count.
#define ROILIB_WARP_FLOOR (-3.402823466e+38F)
// Steps per bin are capped only to keep the float-to-int conversion defined.
#define ROILIB_WARP_GRID_CAP (1 << 20)

// One axis of one box: start, bin size, steps per bin and the step 1/g.
template <class A>
struct WarpAxis {
  A start, bin, step;
  int grid;   // g; g + 1 sample slots per bin (1 when g == 0)
  bool flat;  // end <= start: the bins stay at the start
};

template <class A>
__device__ WarpAxis<A> warp_axis(A lo, A hi, int P, int sampling_ratio) {
  WarpAxis<A> a;
  a.start = lo;
  A length = hi - lo;
  a.flat = !(length > (A)0);
  A roi = a.flat ? (A)0 : length;
  a.bin = roi / (A)P;
  a.grid = sampling_ratio > 0 ? sampling_ratio : clamp_to_int(ceil(roi / (A)P), 0, ROILIB_WARP_GRID_CAP);
  // 1/g in double, then stored in A, as the C++ layer computes it
  a.step = a.grid > 0 ? (A)(1.0 / (double)a.grid) : (A)0;
  return a;
}

// The box's two axes; the corners are C-rounded first (round() is half away from zero).
template <class A>
struct WarpBox {
  bool valid;  // roi_is_valid; an invalid box has no samples
  int batch;
  WarpAxis<A> y, x;
};

template <class A>
__device__ WarpBox<A> warp_box(const A* __restrict__ roi, A scale, int N, int PH, int PW, int sampling_ratio) {
  WarpBox<A> b;
  b.valid = roi_is_valid(roi, N);
  b.batch = b.valid ? (int)roi[0] : 0;
  if (!b.valid) {
    b.x = warp_axis<A>((A)0, (A)0, PW, 1);
    b.y = warp_axis<A>((A)0, (A)0, PH, 1);
    b.x.grid = b.y.grid = -1;  // no sample slots
    return b;
  }
  b.x = warp_axis<A>(round(roi[1] * scale), round(roi[3] * scale), PW, sampling_ratio);
  b.y = warp_axis<A>(round(roi[2] * scale), round(roi[4] * scale), PH, sampling_ratio);
  return b;
}

// f after j steps from p, added one at a time like the forward loop; *present is
// false when the accumulated f has passed p + 1 (that sample slot does not exist).
template <class A>
__device__ A warp_frac(const WarpAxis<A>& a, int p, int j, bool* present) {
  A f = (A)p;
  for (int t = 0; t < j; ++t) f += a.step;
  *present = f <= (A)(p + 1);
  return f;
}

// One axis of a bilinear read with MNC's bounds.
template <class A>
struct WarpTap {
  bool inside;  // within half a cell of the map: the sample is read
  bool moving;  // the value follows the coordinate (not clamped at an edge)
  int lo, hi;
  A wlo, whi;
};

template <class A>
__device__ WarpTap<A> warp_tap(A c, int size) {
  WarpTap<A> t;
  t.inside = !(c < (A)-0.5 || c > (A)size - (A)0.5);
  t.moving = t.inside && c > (A)0;
  t.lo = t.hi = 0;
  t.wlo = t.whi = 0;
  if (!t.inside) return t;
  if (c <= (A)0) c = 0;
  t.lo = (int)c;  // c is in [0, size - 0.5]: truncation is floor
  if (t.lo >= size - 1) {
    t.lo = t.hi = size - 1;
    c = (A)t.lo;
    t.moving = false;
  } else {
    t.hi = t.lo + 1;
  }
  t.whi = c - (A)t.lo;
  t.wlo = (A)1 - t.whi;
  return t;
}

// The tap of sample j of bin p, or inside == false when the slot does not exist.
template <class A>
__device__ WarpTap<A> warp_sample(const WarpAxis<A>& a, int p, int j, int size, A* f) {
  bool present;
  *f = warp_frac(a, p, j, &present);
  WarpTap<A> t = warp_tap<A>(a.start + *f * a.bin, size);
  if (!present) t.inside = false;
  return t;
}

template <class T, class A>
__device__ __forceinline__ void warp_corners(const T* __restrict__ plane, int W, const WarpTap<A>& ty,
                                             const WarpTap<A>& tx, A* v) {
  v[0] = to_acc(plane[(long long)ty.lo * W + tx.lo]);
  v[1] = to_acc(plane[(long long)ty.lo * W + tx.hi]);
  v[2] = to_acc(plane[(long long)ty.hi * W + tx.lo]);
  v[3] = to_acc(plane[(long long)ty.hi * W + tx.hi]);
}

// Largest sample of bin (ph, pw): returns it (0 when no sample counts) and sets
// *wy, *wx to the winner's slots (-1 when none). Row-major order, strict '>'.
template <class T, class A>
__device__ A warp_bin_max(const T* __restrict__ plane, int H, int W, const WarpBox<A>& b, int ph, int pw, int* wy,
                          int* wx) {
  A best = (A)ROILIB_WARP_FLOOR;
  *wy = *wx = -1;
  A f;
  for (int iy = 0; iy <= b.y.grid; ++iy) {
    WarpTap<A> ty = warp_sample(b.y, ph, iy, H, &f);
    if (!ty.inside) continue;
    for (int ix = 0; ix <= b.x.grid; ++ix) {
      WarpTap<A> tx = warp_sample(b.x, pw, ix, W, &f);
      if (!tx.inside) continue;
      A v[4];
      warp_corners(plane, W, ty, tx, v);
      A w1 = ty.wlo * tx.wlo, w2 = ty.wlo * tx.whi, w3 = ty.whi * tx.wlo, w4 = ty.whi * tx.whi;
      A val = w1 * v[0] + w2 * v[1] + w3 * v[2] + w4 * v[3];
      if (val > best) {
        best = val;
        *wy = iy;
        *wx = ix;
      }
    }
  }
  return *wy < 0 ? (A)0 : best;
}

template <class T, class A>
__device__ void warp_forward(long long n, const T* __restrict__ input, const A* __restrict__ rois, int N, int C,
                             int H, int W, int PH, int PW, A scale, int sampling_ratio, T* __restrict__ output) {
  ROILIB_FOR_EACH(i, n) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH), c = (int)(i / PW / PH % C);
    long long k = i / PW / PH / C;
    WarpBox<A> b = warp_box(rois + 5 * k, scale, N, PH, PW, sampling_ratio);
    if (!b.valid) {
      store(output + i, nan_of(A()));
      continue;
    }
    int wy, wx;
    store(output + i, warp_bin_max(input + ((long long)b.batch * C + c) * H * W, H, W, b, ph, pw, &wy, &wx));
  }
}

// First pass of the deterministic backward: winner[i] = wy * (gw + 1) + wx, or -1.
template <class T, class A>
__device__ void warp_argmax(long long n, const T* __restrict__ input, const A* __restrict__ rois, int N, int C,
                            int H, int W, int PH, int PW, A scale, int sampling_ratio, int* __restrict__ winner) {
  ROILIB_FOR_EACH(i, n) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH), c = (int)(i / PW / PH % C);
    long long k = i / PW / PH / C;
    WarpBox<A> b = warp_box(rois + 5 * k, scale, N, PH, PW, sampling_ratio);
    int wy, wx;
    warp_bin_max(input + ((long long)b.batch * C + c) * H * W, H, W, b, ph, pw, &wy, &wx);
    winner[i] = wy < 0 ? -1 : wy * (b.x.grid + 1) + wx;
  }
}

// Backward with atomics: each output adds its gradient to its winner's four corners.
// grad_input is in A and must be zeroed.
template <class T, class A>
__device__ void warp_backward_atomic(long long n, const T* __restrict__ grad_output, const T* __restrict__ input,
                                     const A* __restrict__ rois, int N, int C, int H, int W, int PH, int PW,
                                     A scale, int sampling_ratio, A* __restrict__ grad_input) {
  ROILIB_FOR_EACH(i, n) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH), c = (int)(i / PW / PH % C);
    long long k = i / PW / PH / C;
    WarpBox<A> b = warp_box(rois + 5 * k, scale, N, PH, PW, sampling_ratio);
    long long offset = ((long long)b.batch * C + c) * H * W;
    int wy, wx;
    warp_bin_max(input + offset, H, W, b, ph, pw, &wy, &wx);
    if (wy < 0) continue;
    A f;
    WarpTap<A> ty = warp_sample(b.y, ph, wy, H, &f), tx = warp_sample(b.x, pw, wx, W, &f);
    A g = to_acc(grad_output[i]);
    A* plane = grad_input + offset;
    atomicAdd(plane + (long long)ty.lo * W + tx.lo, g * (ty.wlo * tx.wlo));
    atomicAdd(plane + (long long)ty.lo * W + tx.hi, g * (ty.wlo * tx.whi));
    atomicAdd(plane + (long long)ty.hi * W + tx.lo, g * (ty.whi * tx.wlo));
    atomicAdd(plane + (long long)ty.hi * W + tx.hi, g * (ty.whi * tx.whi));
  }
}

// Deterministic backward, step 1: one work item per box writes
// ranges[5k .. 5k+4] = {image, first row, last row, first column, last column} that
// its samples can touch (every sample lies in [start, start + P * bin] and touches
// the pixel below and the one above it), image -1 when none; tiles.cu then lists the
// boxes of each tile.
template <class A>
__device__ void warp_span(const WarpAxis<A>& a, int P, int size, int* lo, int* hi) {
  // one pixel of slack on the far side for the rounding of the accumulated steps
  A first = floor(a.start) - (A)1, last = floor(a.start + (A)P * a.bin) + (A)2;
  *lo = clamp_to_int(first, 0, size);
  *hi = clamp_to_int(last, -1, size - 1);
}

template <class A>
__device__ void warp_ranges(long long n, const A* __restrict__ rois, int N, int H, int W, int PH, int PW, A scale,
                            int sampling_ratio, int* __restrict__ ranges) {
  ROILIB_FOR_EACH(k, n) {
    WarpBox<A> b = warp_box(rois + 5 * k, scale, N, PH, PW, sampling_ratio);
    int* r = ranges + 5 * k;
    warp_span(b.y, PH, H, r + 1, r + 2);
    warp_span(b.x, PW, W, r + 3, r + 4);
    r[0] = (b.valid && r[1] <= r[2] && r[3] <= r[4]) ? b.batch : -1;
  }
}

// Deterministic backward, step 3: one work item per (image, channel, tile) walks the
// tile's box list in box order and, bin by bin, adds each bin's gradient to the
// corners of its winning sample (from warp_argmax) that lie in the tile: the atomic
// version's terms in its order per pixel (so the CPU build agrees with it bit for
// bit), without atomics. Bins whose span cannot reach the tile are skipped by a
// compare. Every element of grad_input is written.
template <class A>
__device__ __forceinline__ bool warp_bin_near(const WarpAxis<A>& a, int p, int r0, int r1) {
  A lo = a.start + (A)p * a.bin, hi = a.start + (A)(p + 1) * a.bin;
  return !(hi < (A)(r0 - 2) || lo > (A)(r1 + 2));  // a pixel of slack for rounding
}

template <class T, class A>
__device__ void warp_backward_tiles(long long n, const T* __restrict__ grad_output, const A* __restrict__ rois,
                                    const int* __restrict__ lists, const int* __restrict__ cumsum,
                                    const int* __restrict__ winner, int K, int N, int C, int H, int W, int PH,
                                    int PW, A scale, int sampling_ratio, int ts, int TY, int TX,
                                    A* __restrict__ grad_input) {
  ROILIB_FOR_EACH(i, n) {
    TileItem t = tile_item(i, C, 1, H, W, ts, TY, TX, K, cumsum);
    A acc[ROILIB_TILE * ROILIB_TILE];
    for (int p = 0; p < ts * ts; ++p) acc[p] = 0;
    for (int j = 0; j < t.count; ++j) {
      long long k = lists[t.list0 + j];
      WarpBox<A> b = warp_box(rois + 5 * k, scale, N, PH, PW, sampling_ratio);
      long long out0 = (k * C + t.c) * PH * PW;
      for (int ph = 0; ph < PH; ++ph) {
        if (!warp_bin_near(b.y, ph, t.r0, t.r1)) continue;
        for (int pw = 0; pw < PW; ++pw) {
          if (!warp_bin_near(b.x, pw, t.c0, t.c1)) continue;
          int s = winner[out0 + ph * PW + pw];
          if (s < 0) continue;
          A f;
          WarpTap<A> ty = warp_sample(b.y, ph, s / (b.x.grid + 1), H, &f);
          WarpTap<A> tx = warp_sample(b.x, pw, s % (b.x.grid + 1), W, &f);
          A g = to_acc(grad_output[out0 + ph * PW + pw]);
          bool lo_row = ty.lo >= t.r0 && ty.lo <= t.r1, hi_row = ty.hi >= t.r0 && ty.hi <= t.r1;
          bool lo_col = tx.lo >= t.c0 && tx.lo <= t.c1, hi_col = tx.hi >= t.c0 && tx.hi <= t.c1;
          if (lo_row && lo_col) acc[(ty.lo - t.r0) * ts + (tx.lo - t.c0)] += g * (ty.wlo * tx.wlo);
          if (lo_row && hi_col) acc[(ty.lo - t.r0) * ts + (tx.hi - t.c0)] += g * (ty.wlo * tx.whi);
          if (hi_row && lo_col) acc[(ty.hi - t.r0) * ts + (tx.lo - t.c0)] += g * (ty.whi * tx.wlo);
          if (hi_row && hi_col) acc[(ty.hi - t.r0) * ts + (tx.hi - t.c0)] += g * (ty.whi * tx.whi);
        }
      }
    }
    store_tile(t, acc, ts, C, H, W, grad_input);
  }
}

// d position / d (low corner) and d (high corner), times the scale; see
// roilib.reference.roi_warp._corner_rates.
template <class A>
__device__ __forceinline__ void corner_rates(const WarpAxis<A>& a, A f, int P, A scale, A* lo, A* hi) {
  if (a.flat) {
    *lo = scale;
    *hi = 0;
    return;
  }
  A frac = f / (A)P;
  *lo = ((A)1 - frac) * scale;
  *hi = frac * scale;
}

// Box gradient, step 1: one work item per (box, channel) sums, over the bins in
// row-major order, the gradient of its outputs with respect to [x1, y1, x2, y2]
// (rounding taken as the identity, as MNC does). partial is (K, C, 4), overwritten.
template <class T, class A>
__device__ void warp_box_partial(long long n, const T* __restrict__ grad_output, const T* __restrict__ input,
                                 const A* __restrict__ rois, int N, int C, int H, int W, int PH, int PW,
                                 A scale, int sampling_ratio, A* __restrict__ partial) {
  ROILIB_FOR_EACH(i, n) {
    int c = (int)(i % C);
    long long k = i / C;
    WarpBox<A> b = warp_box(rois + 5 * k, scale, N, PH, PW, sampling_ratio);
    const T* plane = input + ((long long)b.batch * C + c) * H * W;
    A sum[4] = {0, 0, 0, 0};
    for (int ph = 0; ph < PH; ++ph) {
      for (int pw = 0; pw < PW; ++pw) {
        int wy, wx;
        warp_bin_max(plane, H, W, b, ph, pw, &wy, &wx);
        if (wy < 0) continue;
        A fy, fx;
        WarpTap<A> ty = warp_sample(b.y, ph, wy, H, &fy), tx = warp_sample(b.x, pw, wx, W, &fx);
        A v[4];
        warp_corners(plane, W, ty, tx, v);
        A dvdy = ty.moving ? tx.wlo * (v[2] - v[0]) + tx.whi * (v[3] - v[1]) : (A)0;
        A dvdx = tx.moving ? ty.wlo * (v[1] - v[0]) + ty.whi * (v[3] - v[2]) : (A)0;
        A y_lo, y_hi, x_lo, x_hi;
        corner_rates(b.y, fy, PH, scale, &y_lo, &y_hi);
        corner_rates(b.x, fx, PW, scale, &x_lo, &x_hi);
        A g = to_acc(grad_output[((k * C + c) * PH + ph) * PW + pw]);
        sum[0] += (g * dvdx) * x_lo;
        sum[1] += (g * dvdy) * y_lo;
        sum[2] += (g * dvdx) * x_hi;
        sum[3] += (g * dvdy) * y_hi;
      }
    }
    for (int j = 0; j < 4; ++j) partial[4 * i + j] = sum[j];
  }
}

// Box gradient, step 2: out[k, j] (K, 5) sums partial[k, :, j - 1] in channel order;
// column 0 (the batch index) is 0. out is overwritten.
template <class A>
__device__ void warp_box_reduce(long long n, const A* __restrict__ partial, int C, A* __restrict__ out) {
  ROILIB_FOR_EACH(i, n) {
    int j = (int)(i % 5);
    long long k = i / 5;
    A acc = 0;
    if (j > 0)
      for (int c = 0; c < C; ++c) acc += partial[(k * C + c) * 4 + (j - 1)];
    out[i] = acc;
  }
}

#define ROI_WARP_ENTRY_POINTS(SUFFIX, T, A)                                                                          \
  extern "C" __global__ void roi_warp_forward_##SUFFIX(long long n, const T* __restrict__ input,                     \
                                                       const A* __restrict__ rois, int N, int C, int H, int W,       \
                                                       int PH, int PW, A scale, int sampling_ratio,                  \
                                                       T* __restrict__ output) {                                     \
    warp_forward<T, A>(n, input, rois, N, C, H, W, PH, PW, scale, sampling_ratio, output);                          \
  }                                                                                                                  \
  extern "C" __global__ void roi_warp_argmax_##SUFFIX(long long n, const T* __restrict__ input,                      \
                                                      const A* __restrict__ rois, int N, int C, int H, int W,        \
                                                      int PH, int PW, A scale, int sampling_ratio,                   \
                                                      int* __restrict__ winner) {                                    \
    warp_argmax<T, A>(n, input, rois, N, C, H, W, PH, PW, scale, sampling_ratio, winner);                           \
  }                                                                                                                  \
  extern "C" __global__ void roi_warp_backward_atomic_##SUFFIX(                                                      \
      long long n, const T* __restrict__ grad_output, const T* __restrict__ input, const A* __restrict__ rois,       \
      int N, int C, int H, int W, int PH, int PW, A scale, int sampling_ratio, A* __restrict__ grad_input) {        \
    warp_backward_atomic<T, A>(n, grad_output, input, rois, N, C, H, W, PH, PW, scale, sampling_ratio, grad_input); \
  }                                                                                                                  \
  extern "C" __global__ void roi_warp_ranges_##SUFFIX(long long n, const A* __restrict__ rois, int N, int H, int W,  \
                                                      int PH, int PW, A scale, int sampling_ratio,                   \
                                                      int* __restrict__ ranges) {                                    \
    warp_ranges<A>(n, rois, N, H, W, PH, PW, scale, sampling_ratio, ranges);                                         \
  }                                                                                                                  \
  extern "C" __global__ void roi_warp_backward_tiles_##SUFFIX(                                                       \
      long long n, const T* __restrict__ grad_output, const A* __restrict__ rois, const int* __restrict__ lists,     \
      const int* __restrict__ cumsum, const int* __restrict__ winner, int K, int N, int C, int H, int W, int PH,     \
      int PW, A scale, int sampling_ratio, int ts, int TY, int TX, A* __restrict__ grad_input) {                     \
    warp_backward_tiles<T, A>(n, grad_output, rois, lists, cumsum, winner, K, N, C, H, W, PH, PW, scale,            \
                              sampling_ratio, ts, TY, TX, grad_input);                                               \
  }                                                                                                                  \
  extern "C" __global__ void roi_warp_box_partial_##SUFFIX(                                                          \
      long long n, const T* __restrict__ grad_output, const T* __restrict__ input, const A* __restrict__ rois,       \
      int N, int C, int H, int W, int PH, int PW, A scale, int sampling_ratio, A* __restrict__ partial) {           \
    warp_box_partial<T, A>(n, grad_output, input, rois, N, C, H, W, PH, PW, scale, sampling_ratio, partial);        \
  }                                                                                                                  \
  extern "C" __global__ void roi_warp_box_reduce_##SUFFIX(long long n, const A* __restrict__ partial, int C,          \
                                                          A* __restrict__ out) {                                     \
    warp_box_reduce<A>(n, partial, C, out);                                                                          \
  }

ROI_WARP_ENTRY_POINTS(f16, __half, float)
ROI_WARP_ENTRY_POINTS(f32, float, float)
ROI_WARP_ENTRY_POINTS(f64, double, double)
