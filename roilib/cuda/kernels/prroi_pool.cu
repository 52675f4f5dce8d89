// prroi_pool.cu: Precise RoI Pooling (IoU-Net) forward, input backward (atomics) and the
// exact box-coordinate gradient (deterministic: per-(box, channel) partials, then a sum
// over channels in channel order).
//
// Pixel i sits at coordinate i and the map is its bilinear interpolant, 0 beyond one cell
// outside. A bin [x0, x1] x [y0, y1] outputs sum_ij X[i,j] K(y0,y1,i) K(x0,x1,j) / area,
// K the exact integral of the hat k(t) = max(0, 1 - |t|) over the interval. The
// geometry is roilib/geometry_prroi.py, operation for operation.
#include "common.cuh"

template <class A>
__device__ __forceinline__ A clamp01(A v) {
  return v < (A)0 ? (A)0 : (v > (A)1 ? (A)1 : v);
}

// k(t) = max(0, 1 - |t|)
template <class A>
__device__ __forceinline__ A hat(A t) {
  A v = (A)1 - (t < (A)0 ? -t : t);
  return v > (A)0 ? v : (A)0;
}

// K(lo, hi, j) = int_lo^hi k(t - j) dt: the rising cell [j-1, j] plus the falling cell
// [j, j+1], each in closed form.
template <class A>
__device__ __forceinline__ A hat_integral(A lo, A hi, long long j) {
  A jf = (A)j;
  A left = jf - (A)1;
  A u0 = clamp01(lo - left), u1 = clamp01(hi - left);
  A v0 = clamp01(lo - jf), v1 = clamp01(hi - jf);
  return (u1 - u0) * (u1 + u0) * (A)0.5 + (v1 - v0) * ((A)2 - v1 - v0) * (A)0.5;
}

// One box: its start, bin size and bin area (0: every bin outputs 0).
template <class A>
struct PrBox {
  bool valid;  // roi_is_valid (device boxes are checked here, not on the host)
  long long batch;
  A x1, y1, bin_w, bin_h, area;
};

template <class A>
__device__ PrBox<A> pr_box(const A* __restrict__ roi, A scale, long long N, long long PH, long long PW) {
  PrBox<A> b;
  b.valid = roi_row_is_valid(roi, N, 5);
  if (!b.valid) {
    b.batch = 0;
    b.x1 = b.y1 = b.bin_w = b.bin_h = b.area = 0;  // an empty box: no pixel is read
    return b;
  }
  b.batch = (long long)roi[0];
  b.x1 = roi[1] * scale;
  b.y1 = roi[2] * scale;
  A x2 = roi[3] * scale, y2 = roi[4] * scale;
  A w = x2 - b.x1, h = y2 - b.y1;
  b.bin_w = (w > (A)0 ? w : (A)0) / (A)PW;
  b.bin_h = (h > (A)0 ? h : (A)0) / (A)PH;
  A area = b.bin_w * b.bin_h;
  b.area = area > (A)0 ? area : (A)0;
  return b;
}

// Bins up to this many columns wide keep their column weights in a small per-thread
// array instead of recomputing them for every row (same values, same order of sums).
#define ROILIB_PRROI_COLUMNS 32

// Pixels [*first, *last] whose hat overlaps [lo, hi], inside [0, size).
template <class A>
__device__ __forceinline__ void pixel_span(A lo, A hi, long long size, long long* first, long long* last) {
  const int big = 1 << 30;
  long long f = clamp_to_int(floor(lo), -big, big), l = clamp_to_int(ceil(hi), -big, big);
  *first = f > 0 ? f : 0;
  *last = l < size - 1 ? l : size - 1;
}

// Forward: one work item per output element (k, c, ph, pw).
template <class T, class A>
__device__ void prroi_pool_forward(long long n, const T* __restrict__ input, const A* __restrict__ rois, long long N, long long C,
                                   long long H, long long W, long long PH, long long PW, A scale,
                                   T* __restrict__ output) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    long long pw = i % PW, ph = i / PW % PH, c = i / PW / PH % C, k = i / PW / PH / C;
    PrBox<A> b = pr_box(rois + 5 * k, scale, N, PH, PW);
    if (!(b.area > (A)0)) {
      store(output + i, b.valid ? (A)0 : nan_of(A()));
      continue;
    }
    A y0 = b.y1 + b.bin_h * (A)ph, y1 = y0 + b.bin_h;
    A x0 = b.x1 + b.bin_w * (A)pw, x1 = x0 + b.bin_w;
    long long r0, r1, c0, c1;
    pixel_span(y0, y1, H, &r0, &r1);
    pixel_span(x0, x1, W, &c0, &c1);
    const T* plane = input + (b.batch * C + c) * H * W;
    A wx[ROILIB_PRROI_COLUMNS];
    bool cached = c1 - c0 < ROILIB_PRROI_COLUMNS;
    if (cached)
      for (long long q = c0; q <= c1; ++q) wx[q - c0] = hat_integral(x0, x1, q);
    A sum = 0;
    for (long long r = r0; r <= r1; ++r) {
      A wy = hat_integral(y0, y1, r);
      if (wy == (A)0) continue;
      A row = 0;
      for (long long q = c0; q <= c1; ++q)
        row += (cached ? wx[q - c0] : hat_integral(x0, x1, q)) * to_acc(plane[r * W + q]);
      sum += wy * row;
    }
    store(output + i, sum / b.area);
  }
}

// Input gradient with atomics: each output element spreads g / area with the weights
// K_y(r) K_x(q). grad_input is in A and must be zeroed.
template <class T, class A>
__device__ void prroi_pool_backward_atomic(long long n, const T* __restrict__ grad_output, const A* __restrict__ rois,
                                           long long N, long long C, long long H, long long W, long long PH, long long PW, A scale,
                                           A* __restrict__ grad_input) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    long long pw = i % PW, ph = i / PW % PH, c = i / PW / PH % C, k = i / PW / PH / C;
    PrBox<A> b = pr_box(rois + 5 * k, scale, N, PH, PW);
    if (!(b.area > (A)0)) continue;
    A go = to_acc(grad_output[i]) / b.area;
    A y0 = b.y1 + b.bin_h * (A)ph, y1 = y0 + b.bin_h;
    A x0 = b.x1 + b.bin_w * (A)pw, x1 = x0 + b.bin_w;
    long long r0, r1, c0, c1;
    pixel_span(y0, y1, H, &r0, &r1);
    pixel_span(x0, x1, W, &c0, &c1);
    A* plane = grad_input + (b.batch * C + c) * H * W;
    A wx[ROILIB_PRROI_COLUMNS];
    bool cached = c1 - c0 < ROILIB_PRROI_COLUMNS;
    if (cached)
      for (long long q = c0; q <= c1; ++q) wx[q - c0] = hat_integral(x0, x1, q);
    for (long long r = r0; r <= r1; ++r) {
      A wy = hat_integral(y0, y1, r);
      if (wy == (A)0) continue;
      for (long long q = c0; q <= c1; ++q) {
        A w = cached ? wx[q - c0] : hat_integral(x0, x1, q);
        if (w != (A)0) atomicAdd(plane + r * W + q, go * (wy * w));
      }
    }
  }
}

// Box gradient, pass 1: one work item per (box k, channel c) writes
// partial[4 * (k*C + c) + {0..3}] = d loss / d {x1, y1, x2, y2} of that channel.
//
// Per bin, with S the integral and O = S / area: moving the edge x0 changes S by minus
// the line integral of the interpolant along it, Sx0 = sum K_y(r) k(x0 - q) X[r, q], so
// dO/dx0 = (-Sx0 + O * bin_h) / area, dO/dx1 = (Sx1 - O * bin_h) / area, and likewise in
// y. x0 = x1_box*s + bin_w*pw moves with x1_box at s(1 - pw/PW), with x2_box at s pw/PW;
// x1 = x0 + bin_w at s(1 - (pw+1)/PW) and s (pw+1)/PW.
template <class T, class A>
__device__ void prroi_pool_box_partial(long long n, const T* __restrict__ grad_output, const T* __restrict__ input,
                                       const A* __restrict__ rois, long long N, long long C, long long H, long long W, long long PH,
                                       long long PW, A scale, A* __restrict__ partial) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    long long c = i % C, k = i / C;
    PrBox<A> b = pr_box(rois + 5 * k, scale, N, PH, PW);
    A d[4] = {0, 0, 0, 0};
    if (b.area > (A)0) {
      const T* plane = input + (b.batch * C + c) * H * W;
      const T* go = grad_output + i * PH * PW;
      for (long long ph = 0; ph < PH; ++ph) {
        A y0 = b.y1 + b.bin_h * (A)ph, y1 = y0 + b.bin_h;
        A fy0 = (A)ph / (A)PH, fy1 = (A)(ph + 1) / (A)PH;
        long long r0, r1;
        pixel_span(y0, y1, H, &r0, &r1);
        for (long long pw = 0; pw < PW; ++pw) {
          A x0 = b.x1 + b.bin_w * (A)pw, x1 = x0 + b.bin_w;
          A fx0 = (A)pw / (A)PW, fx1 = (A)(pw + 1) / (A)PW;
          long long c0, c1;
          pixel_span(x0, x1, W, &c0, &c1);
          A wx[ROILIB_PRROI_COLUMNS], kx0[ROILIB_PRROI_COLUMNS], kx1[ROILIB_PRROI_COLUMNS];
          bool cached = c1 - c0 < ROILIB_PRROI_COLUMNS;
          if (cached) {
            for (long long q = c0; q <= c1; ++q) {
              wx[q - c0] = hat_integral(x0, x1, q);
              kx0[q - c0] = hat(x0 - (A)q);
              kx1[q - c0] = hat(x1 - (A)q);
            }
          }
          A s = 0, sx0 = 0, sx1 = 0, sy0 = 0, sy1 = 0;
          for (long long r = r0; r <= r1; ++r) {
            A wy = hat_integral(y0, y1, r), ky0 = hat(y0 - (A)r), ky1 = hat(y1 - (A)r);
            A row = 0, row_x0 = 0, row_x1 = 0;
            for (long long q = c0; q <= c1; ++q) {
              A v = to_acc(plane[r * W + q]);
              if (cached) {
                row += wx[q - c0] * v;
                row_x0 += kx0[q - c0] * v;
                row_x1 += kx1[q - c0] * v;
              } else {
                row += hat_integral(x0, x1, q) * v;
                row_x0 += hat(x0 - (A)q) * v;
                row_x1 += hat(x1 - (A)q) * v;
              }
            }
            s += wy * row;
            sx0 += wy * row_x0;
            sx1 += wy * row_x1;
            sy0 += ky0 * row;
            sy1 += ky1 * row;
          }
          A g = to_acc(go[ph * PW + pw]);
          A out = s / b.area;
          A d_x0 = (-sx0 + out * b.bin_h) * g / b.area, d_x1 = (sx1 - out * b.bin_h) * g / b.area;
          A d_y0 = (-sy0 + out * b.bin_w) * g / b.area, d_y1 = (sy1 - out * b.bin_w) * g / b.area;
          d[0] += d_x0 * ((A)1 - fx0) + d_x1 * ((A)1 - fx1);
          d[1] += d_y0 * ((A)1 - fy0) + d_y1 * ((A)1 - fy1);
          d[2] += d_x0 * fx0 + d_x1 * fx1;
          d[3] += d_y0 * fy0 + d_y1 * fy1;
        }
      }
    }
    for (int j = 0; j < 4; ++j) partial[4 * i + j] = d[j] * scale;
  }
}

// Box gradient, pass 2: one work item per (box k, column j) of the (K, 5) result sums the
// channels' partials in channel order; column 0, the batch index, gets 0.
template <class A>
__device__ void prroi_pool_box_reduce(long long n, const A* __restrict__ partial, long long C,
                                      A* __restrict__ grad_rois) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    long long k = i / 5;
    int j = (int)(i % 5);
    A sum = 0;
    if (j > 0)
      for (long long c = 0; c < C; ++c) sum += partial[4 * (k * C + c) + (j - 1)];
    grad_rois[i] = sum;
  }
}

// extern "C" entry points, one set per (suffix, element type T, arithmetic type A).
// rois are (K, 5) in A; gradients are written in A (the host casts them back).
#define PRROI_POOL_ENTRY_POINTS(SUFFIX, T, A)                                                                     \
  extern "C" __global__ void prroi_pool_forward_##SUFFIX(long long n, const T* __restrict__ input,                \
                                                         const A* __restrict__ rois, long long N, long long C, long long H,    \
                                                         long long W, long long PH, long long PW, A scale,        \
                                                         T* __restrict__ output) {                                \
    prroi_pool_forward<T, A>(n, input, rois, N, C, H, W, PH, PW, scale, output);                                    \
  }                                                                                                               \
  extern "C" __global__ void prroi_pool_backward_atomic_##SUFFIX(                                                 \
      long long n, const T* __restrict__ grad_output, const A* __restrict__ rois, long long N, long long C, long long H,        \
      long long W, long long PH, long long PW, A scale, A* __restrict__ grad_input) {                              \
    prroi_pool_backward_atomic<T, A>(n, grad_output, rois, N, C, H, W, PH, PW, scale, grad_input);                   \
  }                                                                                                               \
  extern "C" __global__ void prroi_pool_box_partial_##SUFFIX(                                                     \
      long long n, const T* __restrict__ grad_output, const T* __restrict__ input, const A* __restrict__ rois,     \
      long long N, long long C, long long H, long long W, long long PH, long long PW, A scale, A* __restrict__ partial) {       \
    prroi_pool_box_partial<T, A>(n, grad_output, input, rois, N, C, H, W, PH, PW, scale, partial);                   \
  }                                                                                                               \
  extern "C" __global__ void prroi_pool_box_reduce_##SUFFIX(long long n, const A* __restrict__ partial,           \
                                                            long long C, A* __restrict__ grad_rois) {             \
    prroi_pool_box_reduce<A>(n, partial, C, grad_rois);                                                           \
  }

PRROI_POOL_ENTRY_POINTS(f16, __half, float)
PRROI_POOL_ENTRY_POINTS(f32, float, float)
PRROI_POOL_ENTRY_POINTS(f64, double, double)
