// sampling.cuh: bilinear sampling of a box, shared by RoIAlign and RoIWarp.
//
// Both ops put a grid of gh x gw bilinear samples in each of PH x PW bins of a box and
// pool them (average or max). They differ only in where the box is: RoIAlign uses the
// scaled corners as they are (minus half a pixel when aligned), RoIWarp rounds them
// first, like RoIPool. That difference lives in a small "box" struct (AlignBox in
// roi_align.cu, WarpBox in roi_warp.cu) whose grid() turns one row of rois into a
// SampleGrid; everything below takes the box as a template parameter.
//
// Every formula follows torchvision's RoIAlign, operation for operation, so that
// float32 rounding (floor of a sample position, ceil of the adaptive grid) agrees with
// it and with roilib.geometry.
#ifndef ROILIB_SAMPLING_CUH
#define ROILIB_SAMPLING_CUH

#include "common.cuh"

// Where one box's samples are.
template <class A>
struct SampleGrid {
  bool valid;           // the roi row passed roi_is_valid; an invalid box has no samples
  int batch;            // image index
  A y0, x0;             // box start in feature-map pixels
  A bin_h, bin_w;       // bin size
  int gh, gw;           // samples per bin and axis; 0 or less means no samples
  A count;              // divisor of the average: max(gh * gw, 1)
  bool unit_h, unit_w;  // roi size was raised to 1: the bins no longer follow the far corner
};

// The grid on box [x1, x2] x [y1, y2] (feature-map pixels). raise_to_one is
// torchvision's max(roi_size, 1), applied only when aligned=False.
template <class A>
__device__ SampleGrid<A> sample_grid(bool valid, int batch, A x1, A y1, A x2, A y2, int PH, int PW,
                                     int sampling_ratio, bool raise_to_one) {
  SampleGrid<A> g;
  g.valid = valid;
  g.batch = valid ? batch : 0;
  g.y0 = g.x0 = g.bin_h = g.bin_w = 0;
  g.gh = g.gw = 0;
  g.count = 1;
  g.unit_h = g.unit_w = false;
  if (!valid) return g;
  g.y0 = y1;
  g.x0 = x1;
  A roi_h = y2 - y1;
  A roi_w = x2 - x1;
  g.unit_h = raise_to_one && roi_h < (A)1;
  g.unit_w = raise_to_one && roi_w < (A)1;
  if (g.unit_h) roi_h = 1;
  if (g.unit_w) roi_w = 1;
  g.bin_h = roi_h / (A)PH;
  g.bin_w = roi_w / (A)PW;
  // Adaptive grid: ceil(roi / P) samples. The cap only keeps the int conversion
  // defined for absurd boxes; a million samples per bin axis is already unusable.
  const int cap = 1 << 20;
  g.gh = sampling_ratio > 0 ? sampling_ratio : clamp_to_int(ceil(roi_h / (A)PH), 0, cap);
  g.gw = sampling_ratio > 0 ? sampling_ratio : clamp_to_int(ceil(roi_w / (A)PW), 0, cap);
  long long count = (long long)g.gh * g.gw;  // each may be up to 2^20: no int product
  g.count = (A)(count > 1 ? count : 1);
  return g;
}

// Position of sample i of bin p: start + p * bin + (i + 0.5) * bin / g, evaluated as
// (start + p*bin) + ((i + .5) * bin) / g like torchvision.
template <class A>
__device__ __forceinline__ A sample_at(A start, A bin, int g, int p, int i) {
  return start + (A)p * bin + (A)(i + 0.5f) * bin / (A)g;
}

// One axis of a bilinear sample: the two neighbouring pixels and their weights.
template <class A>
struct Tap {
  bool inside;   // false beyond [-1, size]: the whole sample reads 0 (but still counts)
  bool moving;   // the value follows the coordinate (not clamped at an edge)
  int lo, hi;    // neighbouring pixel indices (equal at the last pixel)
  A wlo, whi;    // their weights, 1 - frac and frac
};

template <class A>
__device__ __forceinline__ Tap<A> make_tap(A c, int size) {
  Tap<A> t;
  t.inside = !(c < (A)-1 || c > (A)size);
  t.moving = t.inside && c > (A)0;
  t.lo = t.hi = 0;
  t.wlo = t.whi = 0;
  if (!t.inside) return t;
  if (c <= (A)0) c = 0;
  t.lo = (int)c;  // c is in [0, size]: truncation is floor and the cast is defined
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

// Bilinear value of one (H, W) plane at the sample (ty, tx).
template <class T, class A>
__device__ __forceinline__ A interpolate(const T* __restrict__ plane, int W, const Tap<A>& ty, const Tap<A>& tx) {
  if (!(ty.inside && tx.inside)) return 0;
  A w1 = ty.wlo * tx.wlo, w2 = ty.wlo * tx.whi, w3 = ty.whi * tx.wlo, w4 = ty.whi * tx.whi;
  return w1 * to_acc(plane[ty.lo * W + tx.lo]) + w2 * to_acc(plane[ty.lo * W + tx.hi]) +
         w3 * to_acc(plane[ty.hi * W + tx.lo]) + w4 * to_acc(plane[ty.hi * W + tx.hi]);
}

template <class A>
__device__ __forceinline__ Tap<A> tap_y(const SampleGrid<A>& g, int ph, int iy, int H) {
  return make_tap(sample_at(g.y0, g.bin_h, g.gh, ph, iy), H);
}

template <class A>
__device__ __forceinline__ Tap<A> tap_x(const SampleGrid<A>& g, int pw, int ix, int W) {
  return make_tap(sample_at(g.x0, g.bin_w, g.gw, pw, ix), W);
}

// Mean of the samples of bin (ph, pw).
template <class T, class A>
__device__ A bin_average(const T* __restrict__ plane, int H, int W, const SampleGrid<A>& g, int ph, int pw) {
  A sum = 0;
  for (int iy = 0; iy < g.gh; ++iy) {
    Tap<A> ty = tap_y(g, ph, iy, H);
    for (int ix = 0; ix < g.gw; ++ix) sum += interpolate(plane, W, ty, tap_x(g, pw, ix, W));
  }
  return sum / g.count;
}

// Largest sample of bin (ph, pw) (mmcv's max mode: out-of-range samples read 0).
// *winner = iy * gw + ix of the first largest in iy-major order, or -1 when the bin
// has no samples, which outputs 0.
template <class T, class A>
__device__ A bin_max(const T* __restrict__ plane, int H, int W, const SampleGrid<A>& g, int ph, int pw,
                     int* winner) {
  A best = 0;
  *winner = -1;
  for (int iy = 0; iy < g.gh; ++iy) {
    Tap<A> ty = tap_y(g, ph, iy, H);
    for (int ix = 0; ix < g.gw; ++ix) {
      A v = interpolate(plane, W, ty, tap_x(g, pw, ix, W));
      if (*winner < 0 || v > best) {
        best = v;
        *winner = iy * g.gw + ix;
      }
    }
  }
  return best;
}

// Forward: one work item per output element (k, c, ph, pw). Writes every element.
template <class T, class A, class Box>
__device__ void sampled_forward(long long n, const T* __restrict__ input, const A* __restrict__ rois, int C, int H,
                                int W, int PH, int PW, Box box, int sampling_ratio, int mode,
                                T* __restrict__ output) {
  ROILIB_FOR_EACH(i, n) {
    OutIndex o = out_index(i, C, PH, PW);
    SampleGrid<A> g = box.grid(rois + 5 * o.k, PH, PW, sampling_ratio);
    if (!g.valid) {
      store(output + i, nan_of(A()));
      continue;
    }
    const T* plane = input + ((long long)g.batch * C + o.c) * H * W;
    int winner;
    A v = mode == ROILIB_MAX ? bin_max(plane, H, W, g, o.ph, o.pw, &winner) : bin_average(plane, H, W, g, o.ph, o.pw);
    store(output + i, v);
  }
}

// Max mode, first pass of the deterministic backward: the winning sample of every
// output element, as bin_max reports it (-1: none).
template <class T, class A, class Box>
__device__ void sampled_argmax(long long n, const T* __restrict__ input, const A* __restrict__ rois, int C, int H,
                               int W, int PH, int PW, Box box, int sampling_ratio, int* __restrict__ winner) {
  ROILIB_FOR_EACH(i, n) {
    OutIndex o = out_index(i, C, PH, PW);
    SampleGrid<A> g = box.grid(rois + 5 * o.k, PH, PW, sampling_ratio);
    if (!g.valid) {
      winner[i] = -1;
      continue;
    }
    bin_max(input + ((long long)g.batch * C + o.c) * H * W, H, W, g, o.ph, o.pw, winner + i);
  }
}

// Adds g * weight / count to the four corners of one sample, atomically (bins and
// boxes overlap). Written as torchvision writes it, so that on the CPU, where the
// additions happen in output order, the result equals torchvision's bit for bit.
template <class A>
__device__ __forceinline__ void scatter_sample(A* plane, int W, const Tap<A>& ty, const Tap<A>& tx, A g, A count) {
  if (!(ty.inside && tx.inside)) return;
  atomicAdd(plane + ty.lo * W + tx.lo, g * (ty.wlo * tx.wlo) / count);
  atomicAdd(plane + ty.lo * W + tx.hi, g * (ty.wlo * tx.whi) / count);
  atomicAdd(plane + ty.hi * W + tx.lo, g * (ty.whi * tx.wlo) / count);
  atomicAdd(plane + ty.hi * W + tx.hi, g * (ty.whi * tx.whi) / count);
}

// Backward with atomics: one work item per output element scatters its gradient.
// grad_input is in the arithmetic type A (float32 for float16 inputs) and must be zeroed.
template <class T, class A, class Box>
__device__ void sampled_backward_atomic(long long n, const T* __restrict__ grad_output, const T* __restrict__ input,
                                        const A* __restrict__ rois, int C, int H, int W, int PH, int PW, Box box,
                                        int sampling_ratio, int mode, A* __restrict__ grad_input) {
  ROILIB_FOR_EACH(i, n) {
    OutIndex o = out_index(i, C, PH, PW);
    SampleGrid<A> g = box.grid(rois + 5 * o.k, PH, PW, sampling_ratio);
    if (!g.valid) continue;
    long long plane_offset = ((long long)g.batch * C + o.c) * H * W;
    A go = to_acc(grad_output[i]);
    if (mode == ROILIB_MAX) {
      int s;
      bin_max(input + plane_offset, H, W, g, o.ph, o.pw, &s);
      if (s >= 0)
        scatter_sample(grad_input + plane_offset, W, tap_y(g, o.ph, s / g.gw, H), tap_x(g, o.pw, s % g.gw, W), go,
                       (A)1);
    } else {
      for (int iy = 0; iy < g.gh; ++iy) {
        Tap<A> ty = tap_y(g, o.ph, iy, H);
        for (int ix = 0; ix < g.gw; ++ix)
          scatter_sample(grad_input + plane_offset, W, ty, tap_x(g, o.pw, ix, W), go, g.count);
      }
    }
  }
}

// Pixels [*lo, *hi] that the samples along one axis touch (*lo > *hi: none).
template <class A>
__device__ void touched_span(A start, A bin, int g, int P, int size, int* lo, int* hi) {
  *lo = size;
  *hi = -1;
  for (int p = 0; p < P; ++p) {
    for (int i = 0; i < g; ++i) {
      Tap<A> t = make_tap(sample_at(start, bin, g, p, i), size);
      if (t.inside) {
        *lo = imin(*lo, t.lo);
        *hi = imax(*hi, t.hi);
      }
    }
  }
}

// Deterministic backward, step 1: one work item per box writes
// ranges[5k .. 5k+4] = {image, first row, last row, first column, last column} that
// its samples touch, or image -1 when they touch nothing (tiles.cu turns these into
// per-tile box lists).
template <class A, class Box>
__device__ void sampled_ranges(long long n, const A* __restrict__ rois, int H, int W, int PH, int PW, Box box,
                               int sampling_ratio, int* __restrict__ ranges) {
  ROILIB_FOR_EACH(k, n) {
    SampleGrid<A> g = box.grid(rois + 5 * k, PH, PW, sampling_ratio);
    int* r = ranges + 5 * k;
    touched_span(g.y0, g.bin_h, g.gh, PH, H, r + 1, r + 2);
    touched_span(g.x0, g.bin_w, g.gw, PW, W, r + 3, r + 4);
    r[0] = (g.valid && r[1] <= r[2] && r[3] <= r[4]) ? g.batch : -1;
  }
}

// Sample indices j = p * g + i (bin p, sample i) along one axis, [*lo, *hi], that
// can reach pixels [r0, r1]: a superset, which the caller checks sample by sample
// with the forward's own arithmetic. A sample at c reaches pixel r only if
// c is in [r - 1, r + 1], and samples sit near start + (j + 1/2) * bin / g; the slack
// covers the rounding of both (a few ulps of the largest coordinate, in steps).
template <class A>
__device__ void samples_near(A start, A bin, int g, int P, int r0, int r1, long long* lo, long long* hi) {
  long long total = (long long)P * (long long)imax(g, 0);
  *lo = 0;
  *hi = total - 1;
  if (total <= 0) return;
  A step = bin / (A)g;
  A mag = fabs(step);
  if (!(mag > (A)0)) return;  // every sample in one place: keep them all
  A reach = fabs(start) + fabs(bin) * (A)P + (A)imax(r1, -r1) + (A)2;
  A slack = (A)8 * eps_of(A()) * reach / mag + (A)1;
  if (!(slack < (A)total)) return;
  A a = ((A)(r0 - 1) - start) / step - (A)0.5, b = ((A)(r1 + 1) - start) / step - (A)0.5;
  if (a > b) {
    A t = a;
    a = b;
    b = t;
  }
  A first = floor(a - slack), last = ceil(b + slack);
  *lo = first <= (A)0 ? 0 : (first >= (A)total ? total : (long long)first);
  *hi = last >= (A)(total - 1) ? total - 1 : (last < (A)0 ? -1 : (long long)last);
}

// Adds one sample's four corner weights, times each channel's gradient g[q], to the
// tile accumulators acc + q * ts * ts of nc channels, keeping the corners inside the
// tile (rows r0..r1, columns c0..c1). It uses scatter_sample's arithmetic and corner
// order, so each pixel of each channel receives the very terms, in the very order,
// that the atomic backward adds on the CPU.
template <class A>
__device__ __forceinline__ void add_to_tile(A* acc, int nc, int ts, int r0, int r1, int c0, int c1,
                                            const Tap<A>& ty, const Tap<A>& tx, const A* g, A count) {
  if (!(ty.inside && tx.inside)) return;
  bool lo_row = ty.lo >= r0 && ty.lo <= r1, hi_row = ty.hi >= r0 && ty.hi <= r1;
  bool lo_col = tx.lo >= c0 && tx.lo <= c1, hi_col = tx.hi >= c0 && tx.hi <= c1;
  int p1 = (ty.lo - r0) * ts + (tx.lo - c0), p2 = (ty.lo - r0) * ts + (tx.hi - c0);
  int p3 = (ty.hi - r0) * ts + (tx.lo - c0), p4 = (ty.hi - r0) * ts + (tx.hi - c0);
  A w1 = ty.wlo * tx.wlo, w2 = ty.wlo * tx.whi, w3 = ty.whi * tx.wlo, w4 = ty.whi * tx.whi;
  for (int q = 0; q < nc; ++q) {
    A* a = acc + q * ts * ts;
    if (lo_row && lo_col) a[p1] += g[q] * w1 / count;
    if (lo_row && hi_col) a[p2] += g[q] * w2 / count;
    if (hi_row && lo_col) a[p3] += g[q] * w3 / count;
    if (hi_row && hi_col) a[p4] += g[q] * w4 / count;
  }
}

// Deterministic backward, step 3 (after tiles.cu has listed, per tile, the boxes whose
// ranges meet it, in box order): one work item per (image b, group of cg channels,
// tile) sums into private ts x ts accumulators (one per channel; the channels share
// the box geometry), box by box from its list and, within a box, bin
// by bin and sample by sample, only the samples that can reach the tile
// (samples_near). No atomics and a fixed order: bitwise identical run to run, and on
// the CPU build equal to the atomic backward bit for bit. Every element of grad_input
// is written (it needs no zeroing).
//
// lists[t * K + j], j < counts(t) = cumsum[t * K + K - 1], are tile t's boxes.
template <class T, class A, class Box>
__device__ void sampled_backward_tiles(long long n, const T* __restrict__ grad_output, const A* __restrict__ rois,
                                       const int* __restrict__ lists, const int* __restrict__ cumsum,
                                       const int* __restrict__ winner, int K, int C, int H, int W, int PH, int PW,
                                       Box box, int sampling_ratio, int mode, int ts, int cg, int TY, int TX,
                                       A* __restrict__ grad_input) {
  ROILIB_FOR_EACH(i, n) {
    TileItem t = tile_item(i, C, cg, H, W, ts, TY, TX, K, cumsum);
    int r0 = t.r0, r1 = t.r1, c0 = t.c0, c1 = t.c1;
    A acc[ROILIB_TILE_CHANNELS * ROILIB_TILE * ROILIB_TILE];
    for (int p = 0; p < t.nc * ts * ts; ++p) acc[p] = 0;
    for (int j = 0; j < t.count; ++j) {
      long long k = lists[t.list0 + j];
      SampleGrid<A> g = box.grid(rois + 5 * k, PH, PW, sampling_ratio);
      long long ylo, yhi, xlo, xhi;
      samples_near(g.y0, g.bin_h, g.gh, PH, r0, r1, &ylo, &yhi);
      samples_near(g.x0, g.bin_w, g.gw, PW, c0, c1, &xlo, &xhi);
      if (ylo > yhi || xlo > xhi) continue;
      long long out0 = (k * C + t.c) * PH * PW;  // channel q of the item at out0 + q * PH * PW
      int ph0 = (int)(ylo / g.gh), ph1 = (int)(yhi / g.gh), pw0 = (int)(xlo / g.gw), pw1 = (int)(xhi / g.gw);
      // The taps of the candidate rows and columns serve every bin and channel: compute
      // them once when they fit (the atomic version recomputes them per sample).
      Tap<A> xtaps[ROILIB_TAP_CACHE], ytaps[ROILIB_TAP_CACHE];
      bool cached = xhi - xlo < ROILIB_TAP_CACHE && yhi - ylo < ROILIB_TAP_CACHE;
      if (cached) {
        for (long long jx = xlo; jx <= xhi; ++jx) xtaps[jx - xlo] = tap_x(g, (int)(jx / g.gw), (int)(jx % g.gw), W);
        for (long long jy = ylo; jy <= yhi; ++jy) ytaps[jy - ylo] = tap_y(g, (int)(jy / g.gh), (int)(jy % g.gh), H);
      }
      for (int ph = ph0; ph <= ph1; ++ph) {
        for (int pw = pw0; pw <= pw1; ++pw) {
          long long o = out0 + ph * PW + pw;
          A grad[ROILIB_TILE_CHANNELS];
          for (int q = 0; q < t.nc; ++q) grad[q] = to_acc(grad_output[o + (long long)q * PH * PW]);
          if (mode == ROILIB_MAX) {
            for (int q = 0; q < t.nc; ++q) {
              int s = winner[o + (long long)q * PH * PW];
              if (s < 0) continue;
              long long jy = (long long)ph * g.gh + s / g.gw, jx = (long long)pw * g.gw + s % g.gw;
              if (jy < ylo || jy > yhi || jx < xlo || jx > xhi) continue;  // cannot reach the tile
              add_to_tile(acc + q * ts * ts, 1, ts, r0, r1, c0, c1,
                          cached ? ytaps[jy - ylo] : tap_y(g, ph, s / g.gw, H),
                          cached ? xtaps[jx - xlo] : tap_x(g, pw, s % g.gw, W), grad + q, (A)1);
            }
            continue;
          }
          int iy0 = (int)(ylo - (long long)ph * g.gh), iy1 = (int)(yhi - (long long)ph * g.gh);
          long long jx0 = (long long)pw * g.gw;
          int ix0 = imax((int)(xlo - jx0), 0), ix1 = imin((int)(xhi - jx0), g.gw - 1);
          for (int iy = imax(iy0, 0); iy <= imin(iy1, g.gh - 1); ++iy) {
            Tap<A> tyap = cached ? ytaps[(long long)ph * g.gh + iy - ylo] : tap_y(g, ph, iy, H);
            if (!tyap.inside || tyap.hi < r0 || tyap.lo > r1) continue;
            for (int ix = ix0; ix <= ix1; ++ix) {
              Tap<A> txap = cached ? xtaps[jx0 + ix - xlo] : tap_x(g, pw, ix, W);
              add_to_tile(acc, t.nc, ts, r0, r1, c0, c1, tyap, txap, grad, g.count);
            }
          }
        }
      }
    }
    store_tile(t, acc, ts, C, H, W, grad_input);
  }
}

#endif  // ROILIB_SAMPLING_CUH
