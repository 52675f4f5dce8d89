// roi_align_rotated.cu: rotated RoIAlign (detectron2's ROIAlignRotated) forward, input
// gradient (with atomics) and box gradient (deterministic: per-(box, channel) partials,
// then a sum over channels in channel order).
//
// Boxes are (K, 6) rows [batch, cx, cy, w, h, angle_degrees]. RoIAlign's grid is laid out
// in the box's frame (centred on the origin) and rotated counter-clockwise about the
// centre: y = yy cos - xx sin + cy, x = yy sin + xx cos + cx. The geometry is
// roilib/geometry_rotated.py, operation for operation; the bilinear read and its
// out-of-range rules are RoIAlign's (make_tap in sampling.cuh).
#include "sampling.cuh"

// One rotated box on the feature map.
template <class A>
struct RotatedGrid {
  bool valid;            // roi_row_is_valid, and a size of at least 0; else no samples
  long long batch;
  A cx, cy;              // centre (minus half a pixel when aligned)
  A cos_t, sin_t;        // of the angle (from the host: float64, rounded to A)
  A start_h, start_w;    // -h/2, -w/2: the box frame's first edge
  A bin_h, bin_w;        // bin size
  int gh, gw;            // samples per bin and axis (0: no samples)
  A count;               // max(gh * gw, 1)
};

// roi: one row [batch, cx, cy, w, h, angle]; trig: its (cos, sin), computed once per box
// by the host (roilib.geometry_rotated.angle_cos_sin) rather than per output element.
template <class A>
__device__ RotatedGrid<A> rotated_grid(const A* __restrict__ roi, const A* __restrict__ trig, A scale, long long N,
                                       long long PH, long long PW, int sampling_ratio, bool aligned) {
  RotatedGrid<A> g;
  // device boxes are not checked on the host (roilib.cuda._host): a bad row has no
  // samples, and the forward writes NaN for it
  g.valid = roi_row_is_valid(roi, N, 6) && roi[3] >= (A)0 && roi[4] >= (A)0;
  if (!g.valid) {
    g.batch = 0;
    g.cx = g.cy = g.cos_t = g.sin_t = g.start_h = g.start_w = g.bin_h = g.bin_w = 0;
    g.gh = g.gw = 0;
    g.count = 1;
    return g;
  }
  g.batch = (long long)roi[0];
  A off = aligned ? (A)0.5 : (A)0;
  g.cx = roi[1] * scale - off;
  g.cy = roi[2] * scale - off;
  A w = roi[3] * scale;
  A h = roi[4] * scale;
  if (!aligned) {  // mmcv's legacy option: malformed boxes become at least 1 x 1
    if (w < (A)1) w = 1;
    if (h < (A)1) h = 1;
  }
  g.cos_t = trig[0];
  g.sin_t = trig[1];
  g.bin_h = h / (A)PH;
  g.bin_w = w / (A)PW;
  const int cap = 1 << 20;  // keeps the int conversion defined for absurd boxes
  g.gh = sampling_ratio > 0 ? sampling_ratio : clamp_to_int(ceil(h / (A)PH), 0, cap);
  g.gw = sampling_ratio > 0 ? sampling_ratio : clamp_to_int(ceil(w / (A)PW), 0, cap);
  long long count = (long long)g.gh * g.gw;
  g.count = (A)(count > 1 ? count : 1);
  g.start_h = -h / (A)2;
  g.start_w = -w / (A)2;
  return g;
}

// Sample (iy, ix) of bin (ph, pw) on the map: taps along y and x.
template <class A>
__device__ __forceinline__ void rotated_taps(const RotatedGrid<A>& g, long long ph, long long pw, int iy, int ix,
                                             long long H, long long W, Tap<A>* ty, Tap<A>* tx) {
  A yy = g.start_h + (A)ph * g.bin_h + (A)(iy + 0.5f) * g.bin_h / (A)g.gh;
  A xx = g.start_w + (A)pw * g.bin_w + (A)(ix + 0.5f) * g.bin_w / (A)g.gw;
  A y = (yy * g.cos_t - xx * g.sin_t) + g.cy;
  A x = (yy * g.sin_t + xx * g.cos_t) + g.cx;
  *ty = make_tap(y, (int)H);
  *tx = make_tap(x, (int)W);
}

template <class T, class A>
__device__ __forceinline__ A read_bilinear(const T* __restrict__ plane, long long W, const Tap<A>& ty,
                                           const Tap<A>& tx) {
  if (!(ty.inside && tx.inside)) return 0;
  long long r0 = (long long)ty.lo * W, r1 = (long long)ty.hi * W;
  A w1 = ty.wlo * tx.wlo, w2 = ty.wlo * tx.whi, w3 = ty.whi * tx.wlo, w4 = ty.whi * tx.whi;
  return w1 * to_acc(plane[r0 + tx.lo]) + w2 * to_acc(plane[r0 + tx.hi]) + w3 * to_acc(plane[r1 + tx.lo]) +
         w4 * to_acc(plane[r1 + tx.hi]);
}

// Forward: one work item per output element (k, c, ph, pw), the mean of its bin's samples.
template <class T, class A>
__device__ void roi_align_rotated_forward(long long n, const T* __restrict__ input, const A* __restrict__ rois,
                                          const A* __restrict__ trig, long long N, long long C, long long H, long long W,
                                          long long PH, long long PW, A scale, int sampling_ratio, bool aligned,
                                          T* __restrict__ output) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    long long pw = i % PW, ph = i / PW % PH, c = i / PW / PH % C, k = i / PW / PH / C;
    RotatedGrid<A> g = rotated_grid(rois + 6 * k, trig + 2 * k, scale, N, PH, PW, sampling_ratio, aligned);
    if (!g.valid) {
      store(output + i, nan_of(A()));
      continue;
    }
    const T* plane = input + (g.batch * C + c) * H * W;
    A sum = 0;
    for (int iy = 0; iy < g.gh; ++iy) {
      for (int ix = 0; ix < g.gw; ++ix) {
        Tap<A> ty, tx;
        rotated_taps(g, ph, pw, iy, ix, H, W, &ty, &tx);
        sum += read_bilinear(plane, W, ty, tx);
      }
    }
    store(output + i, sum / g.count);
  }
}

// Backward with atomics: one work item per output element scatters g / count times each
// sample's four bilinear weights. grad_input is in A and must be zeroed.
template <class T, class A>
__device__ void roi_align_rotated_backward_atomic(long long n, const T* __restrict__ grad_output,
                                                  const A* __restrict__ rois, const A* __restrict__ trig,
                                                  long long N, long long C, long long H, long long W,
                                                  long long PH, long long PW, A scale, int sampling_ratio,
                                                  bool aligned, A* __restrict__ grad_input) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    long long pw = i % PW, ph = i / PW % PH, c = i / PW / PH % C, k = i / PW / PH / C;
    RotatedGrid<A> g = rotated_grid(rois + 6 * k, trig + 2 * k, scale, N, PH, PW, sampling_ratio, aligned);
    A* plane = grad_input + (g.batch * C + c) * H * W;
    A go = to_acc(grad_output[i]);
    for (int iy = 0; iy < g.gh; ++iy) {
      for (int ix = 0; ix < g.gw; ++ix) {
        Tap<A> ty, tx;
        rotated_taps(g, ph, pw, iy, ix, H, W, &ty, &tx);
        if (!(ty.inside && tx.inside)) continue;
        long long r0 = (long long)ty.lo * W, r1 = (long long)ty.hi * W;
        atomicAdd(plane + r0 + tx.lo, go * (ty.wlo * tx.wlo) / g.count);
        atomicAdd(plane + r0 + tx.hi, go * (ty.wlo * tx.whi) / g.count);
        atomicAdd(plane + r1 + tx.lo, go * (ty.whi * tx.wlo) / g.count);
        atomicAdd(plane + r1 + tx.hi, go * (ty.whi * tx.whi) / g.count);
      }
    }
  }
}

// Box gradient, pass 1: one work item per (box k, channel c) writes
// partial[5 * (k*C + c) + {0..4}] = d loss / d {cx, cy, w, h, angle} of that channel.
//
// A sample sits at y = yy cos - xx sin + cy s - off, x = yy sin + xx cos + cx s - off with
// yy = h s (fy - 1/2), xx = w s (fx - 1/2), f = (p + (i + .5)/g) / P. So dy/dcy = dx/dcx = s,
// dy/dh = s (fy - 1/2) cos, dx/dh = s (fy - 1/2) sin, dy/dw = -s (fx - 1/2) sin,
// dx/dw = s (fx - 1/2) cos, dy/dt = -yy sin - xx cos, dx/dt = yy cos - xx sin (times
// pi/180 per degree). The bilinear value moves with y at rate
// (1 - lx)(X[yh,xl] - X[yl,xl]) + lx (X[yh,xh] - X[yl,xh]), not at all where y was clamped
// or the sample is out of range; a size raised to 1 (aligned=False) gets no gradient.
template <class T, class A>
__device__ void roi_align_rotated_box_partial(long long n, const T* __restrict__ grad_output,
                                              const T* __restrict__ input, const A* __restrict__ rois,
                                              const A* __restrict__ trig, long long N, long long C, long long H, long long W,
                                              long long PH, long long PW, A scale, int sampling_ratio, bool aligned,
                                              A* __restrict__ partial) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    long long c = i % C, k = i / C;
    const A* roi = rois + 6 * k;
    RotatedGrid<A> g = rotated_grid(roi, trig + 2 * k, scale, N, PH, PW, sampling_ratio, aligned);
    bool raised_w = !aligned && roi[3] * scale < (A)1;
    bool raised_h = !aligned && roi[4] * scale < (A)1;
    const T* plane = input + (g.batch * C + c) * H * W;
    const T* go = grad_output + i * PH * PW;
    A d[5] = {0, 0, 0, 0, 0};
    for (long long ph = 0; ph < PH; ++ph) {
      for (long long pw = 0; pw < PW; ++pw) {
        A grad = to_acc(go[ph * PW + pw]) / g.count;
        for (int iy = 0; iy < g.gh; ++iy) {
          A yy = g.start_h + (A)ph * g.bin_h + (A)(iy + 0.5f) * g.bin_h / (A)g.gh;
          A fy = ((A)ph + ((A)iy + (A)0.5) / (A)g.gh) / (A)PH - (A)0.5;
          for (int ix = 0; ix < g.gw; ++ix) {
            A xx = g.start_w + (A)pw * g.bin_w + (A)(ix + 0.5f) * g.bin_w / (A)g.gw;
            A fx = ((A)pw + ((A)ix + (A)0.5) / (A)g.gw) / (A)PW - (A)0.5;
            Tap<A> ty = make_tap((yy * g.cos_t - xx * g.sin_t) + g.cy, (int)H);
            Tap<A> tx = make_tap((yy * g.sin_t + xx * g.cos_t) + g.cx, (int)W);
            if (!(ty.inside && tx.inside)) continue;
            long long r0 = (long long)ty.lo * W, r1 = (long long)ty.hi * W;
            A v1 = to_acc(plane[r0 + tx.lo]), v2 = to_acc(plane[r0 + tx.hi]);
            A v3 = to_acc(plane[r1 + tx.lo]), v4 = to_acc(plane[r1 + tx.hi]);
            A gy = ty.moving ? grad * (tx.wlo * (v3 - v1) + tx.whi * (v4 - v2)) : (A)0;
            A gx = tx.moving ? grad * (ty.wlo * (v2 - v1) + ty.whi * (v4 - v3)) : (A)0;
            d[0] += gx;
            d[1] += gy;
            if (!raised_w) d[2] += (gx * g.cos_t - gy * g.sin_t) * fx;
            if (!raised_h) d[3] += (gy * g.cos_t + gx * g.sin_t) * fy;
            d[4] += gy * (-yy * g.sin_t - xx * g.cos_t) + gx * (yy * g.cos_t - xx * g.sin_t);
          }
        }
      }
    }
    for (int j = 0; j < 4; ++j) partial[5 * i + j] = d[j] * scale;
    partial[5 * i + 4] = d[4] * (A)(3.14159265358979323846 / 180.0);
  }
}

// Box gradient, pass 2: one work item per (box k, column j) of the (K, 6) result sums the
// channels' partials in channel order; column 0, the batch index, gets 0.
template <class A>
__device__ void roi_align_rotated_box_reduce(long long n, const A* __restrict__ partial, long long C,
                                             A* __restrict__ grad_rois) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    long long k = i / 6;
    int j = (int)(i % 6);
    A sum = 0;
    if (j > 0)
      for (long long c = 0; c < C; ++c) sum += partial[5 * (k * C + c) + (j - 1)];
    grad_rois[i] = sum;
  }
}

// extern "C" entry points, one set per (suffix, element type T, arithmetic type A).
// rois are (K, 6) and trig (K, 2) in A; the input gradient is written in A (the host
// casts it back).
#define ROI_ALIGN_ROTATED_ENTRY_POINTS(SUFFIX, T, A)                                                             \
  extern "C" __global__ void roi_align_rotated_forward_##SUFFIX(                                                 \
      long long n, const T* __restrict__ input, const A* __restrict__ rois, const A* __restrict__ trig,           \
      long long N, long long C, long long H, long long W, long long PH, long long PW, A scale, int sampling_ratio, int aligned, \
      T* __restrict__ output) {                                                                                  \
    roi_align_rotated_forward<T, A>(n, input, rois, trig, N, C, H, W, PH, PW, scale, sampling_ratio,               \
                                    aligned != 0, output);                                                       \
  }                                                                                                              \
  extern "C" __global__ void roi_align_rotated_backward_atomic_##SUFFIX(                                         \
      long long n, const T* __restrict__ grad_output, const A* __restrict__ rois, const A* __restrict__ trig,     \
      long long N, long long C, long long H, long long W, long long PH, long long PW, A scale, int sampling_ratio, int aligned, \
      A* __restrict__ grad_input) {                                                                              \
    roi_align_rotated_backward_atomic<T, A>(n, grad_output, rois, trig, N, C, H, W, PH, PW, scale,                 \
                                            sampling_ratio, aligned != 0, grad_input);                           \
  }                                                                                                              \
  extern "C" __global__ void roi_align_rotated_box_partial_##SUFFIX(                                             \
      long long n, const T* __restrict__ grad_output, const T* __restrict__ input, const A* __restrict__ rois,    \
      const A* __restrict__ trig, long long N, long long C, long long H, long long W, long long PH, long long PW, A scale,      \
      int sampling_ratio, int aligned, A* __restrict__ partial) {                                                \
    roi_align_rotated_box_partial<T, A>(n, grad_output, input, rois, trig, N, C, H, W, PH, PW, scale,               \
                                        sampling_ratio, aligned != 0, partial);                                  \
  }                                                                                                              \
  extern "C" __global__ void roi_align_rotated_box_reduce_##SUFFIX(long long n, const A* __restrict__ partial,   \
                                                                   long long C, A* __restrict__ grad_rois) {     \
    roi_align_rotated_box_reduce<A>(n, partial, C, grad_rois);                                                   \
  }

ROI_ALIGN_ROTATED_ENTRY_POINTS(f16, __half, float)
ROI_ALIGN_ROTATED_ENTRY_POINTS(f32, float, float)
ROI_ALIGN_ROTATED_ENTRY_POINTS(f64, double, double)
