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
__device__ SampleGrid<A> sample_grid(int batch, A x1, A y1, A x2, A y2, int PH, int PW,
                                     int sampling_ratio, bool raise_to_one) {
  SampleGrid<A> g;
  g.batch = batch;
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
  g.count = (A)imax(g.gh * g.gw, 1);
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

// How much pixel p weighs in this tap (both weights when lo == hi).
template <class A>
__device__ __forceinline__ A tap_weight(const Tap<A>& t, int p) {
  A w = 0;
  if (t.lo == p) w += t.wlo;
  if (t.hi == p) w += t.whi;
  return w;
}

// Bilinear value of one (H, W) plane at the sample (ty, tx).
template <class T, class A>
__device__ __forceinline__ A interpolate(const T* plane, int W, const Tap<A>& ty, const Tap<A>& tx) {
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
__device__ A bin_average(const T* plane, int H, int W, const SampleGrid<A>& g, int ph, int pw) {
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
__device__ A bin_max(const T* plane, int H, int W, const SampleGrid<A>& g, int ph, int pw, int* winner) {
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

// Forward: one work item per output element (k, c, ph, pw).
template <class T, class A, class Box>
__device__ void sampled_forward(long n, const T* input, const A* rois, int C, int H, int W, int PH, int PW,
                                Box box, int sampling_ratio, int mode, T* output) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)blockDim.x * gridDim.x) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH), c = (int)(i / PW / PH % C);
    long k = i / PW / PH / C;
    SampleGrid<A> g = box.grid(rois + 5 * k, PH, PW, sampling_ratio);
    const T* plane = input + ((long)g.batch * C + c) * H * W;
    int winner;
    A v = mode == ROILIB_MAX ? bin_max(plane, H, W, g, ph, pw, &winner) : bin_average(plane, H, W, g, ph, pw);
    store(output + i, v);
  }
}

// Max mode, first pass of the deterministic backward: the winning sample of every
// output element, as bin_max reports it.
template <class T, class A, class Box>
__device__ void sampled_argmax(long n, const T* input, const A* rois, int C, int H, int W, int PH, int PW,
                               Box box, int sampling_ratio, int* winner) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)blockDim.x * gridDim.x) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH), c = (int)(i / PW / PH % C);
    long k = i / PW / PH / C;
    SampleGrid<A> g = box.grid(rois + 5 * k, PH, PW, sampling_ratio);
    bin_max(input + ((long)g.batch * C + c) * H * W, H, W, g, ph, pw, winner + i);
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
__device__ void sampled_backward_atomic(long n, const T* grad_output, const T* input, const A* rois, int C, int H,
                                        int W, int PH, int PW, Box box, int sampling_ratio, int mode,
                                        A* grad_input) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)blockDim.x * gridDim.x) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH), c = (int)(i / PW / PH % C);
    long k = i / PW / PH / C;
    SampleGrid<A> g = box.grid(rois + 5 * k, PH, PW, sampling_ratio);
    long plane_offset = ((long)g.batch * C + c) * H * W;
    A go = to_acc(grad_output[i]);
    if (mode == ROILIB_MAX) {
      int s;
      bin_max(input + plane_offset, H, W, g, ph, pw, &s);
      if (s >= 0)
        scatter_sample(grad_input + plane_offset, W, tap_y(g, ph, s / g.gw, H), tap_x(g, pw, s % g.gw, W), go, (A)1);
    } else {
      for (int iy = 0; iy < g.gh; ++iy) {
        Tap<A> ty = tap_y(g, ph, iy, H);
        for (int ix = 0; ix < g.gw; ++ix)
          scatter_sample(grad_input + plane_offset, W, ty, tap_x(g, pw, ix, W), go, g.count);
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
// its samples touch, or image -1 when they touch nothing, so that step 2 can skip
// boxes with a few integer compares.
template <class A, class Box>
__device__ void sampled_ranges(long n, const A* rois, int H, int W, int PH, int PW, Box box, int sampling_ratio,
                               int* ranges) {
  for (long k = blockIdx.x * (long)blockDim.x + threadIdx.x; k < n; k += (long)blockDim.x * gridDim.x) {
    SampleGrid<A> g = box.grid(rois + 5 * k, PH, PW, sampling_ratio);
    int* r = ranges + 5 * k;
    touched_span(g.y0, g.bin_h, g.gh, PH, H, r + 1, r + 2);
    touched_span(g.x0, g.bin_w, g.gw, PW, W, r + 3, r + 4);
    r[0] = (r[1] <= r[2] && r[3] <= r[4]) ? g.batch : -1;
  }
}

// Deterministic backward, step 2: one work item per input element (b, c, h, w) gathers,
// in a fixed order (boxes, then bins), every contribution that the atomic version
// scatters to it. No floating-point atomics, so the sum is identical run to run.
//
// avg: a sample's weight on pixel (h, w) is wy(h) * wx(w), so a bin's total weight is
// (sum over its rows of wy) * (sum over its columns of wx): the loops stay separable.
// max: only the winning sample of each bin (from sampled_argmax) counts.
// grad_input is in A and is overwritten.
template <class T, class A, class Box>
__device__ void sampled_backward_gather(long n, const T* grad_output, const A* rois, const int* ranges,
                                        const int* winner, int K, int C, int H, int W, int PH, int PW, Box box,
                                        int sampling_ratio, int mode, A* grad_input) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)blockDim.x * gridDim.x) {
    int w = (int)(i % W), h = (int)(i / W % H), c = (int)(i / W / H % C);
    int b = (int)(i / W / H / C);
    A acc = 0;
    for (int k = 0; k < K; ++k) {
      const int* r = ranges + 5 * k;
      if (r[0] != b || h < r[1] || h > r[2] || w < r[3] || w > r[4]) continue;
      SampleGrid<A> g = box.grid(rois + 5 * (long)k, PH, PW, sampling_ratio);
      long out0 = ((long)k * C + c) * PH * PW;
      for (int ph = 0; ph < PH; ++ph) {
        if (mode == ROILIB_MAX) {
          for (int pw = 0; pw < PW; ++pw) {
            int s = winner[out0 + ph * PW + pw];
            if (s < 0) continue;
            Tap<A> ty = tap_y(g, ph, s / g.gw, H), tx = tap_x(g, pw, s % g.gw, W);
            if (!(ty.inside && tx.inside)) continue;
            A wy = tap_weight(ty, h), wx = tap_weight(tx, w);
            if (wy != (A)0 && wx != (A)0) acc += to_acc(grad_output[out0 + ph * PW + pw]) * (wy * wx);
          }
        } else {
          A wy = 0;
          for (int iy = 0; iy < g.gh; ++iy) wy += tap_weight(tap_y(g, ph, iy, H), h);
          if (wy == (A)0) continue;
          for (int pw = 0; pw < PW; ++pw) {
            A wx = 0;
            for (int ix = 0; ix < g.gw; ++ix) wx += tap_weight(tap_x(g, pw, ix, W), w);
            if (wx != (A)0) acc += to_acc(grad_output[out0 + ph * PW + pw]) * (wy * wx) / g.count;
          }
        }
      }
    }
    grad_input[i] = acc;
  }
}

#endif  // ROILIB_SAMPLING_CUH
