// roi_align.cu: RoIAlign (Mask R-CNN) forward, backward and box-coordinate gradient.
//
// Semantics: torchvision's roi_align (mode "avg") and mmcv's max mode; see
// sampling.cuh for the shared sampling code and DESIGN.md for the exact rules.
#include "sampling.cuh"

// RoIAlign's box: scaled corners, shifted by half a pixel when aligned. `images` is N,
// for roi_is_valid.
template <class A>
struct AlignBox {
  A scale;
  bool aligned;
  int images;

  __device__ SampleGrid<A> grid(const A* roi, int PH, int PW, int sampling_ratio) const {
    A off = aligned ? (A)0.5 : (A)0;
    bool valid = roi_is_valid(roi, images);
    return sample_grid<A>(valid, (int)roi[0], roi[1] * scale - off, roi[2] * scale - off, roi[3] * scale - off,
                          roi[4] * scale - off, PH, PW, sampling_ratio, !aligned);
  }
};

// Adds one sample's contribution to d = d loss / d {x1, y1, x2, y2}.
//
// The sample sits at y = y1*s - off + f * (y2 - y1)*s with f = (ph + (iy + .5)/gh) / PH,
// so dy/dy1 = s(1 - f) and dy/dy2 = s f; when the height was raised to 1 the bins stop
// following y2: dy/dy1 = s, dy/dy2 = 0. The bilinear value changes with y at rate
// (1 - lx)(X[yh,xl] - X[yl,xl]) + lx (X[yh,xh] - X[yl,xh]), and not at all where y was
// clamped (y <= 0, at or past the last row) or the sample is out of range. Same for x.
template <class T, class A>
__device__ void add_box_gradient(const T* __restrict__ plane, int H, int W, const SampleGrid<A>& g, A scale, int PH,
                                 int PW, int ph, int pw, int iy, int ix, A grad, A* d) {
  Tap<A> ty = tap_y(g, ph, iy, H), tx = tap_x(g, pw, ix, W);
  if (!(ty.inside && tx.inside)) return;
  A v1 = to_acc(plane[ty.lo * W + tx.lo]), v2 = to_acc(plane[ty.lo * W + tx.hi]);
  A v3 = to_acc(plane[ty.hi * W + tx.lo]), v4 = to_acc(plane[ty.hi * W + tx.hi]);
  A dv_dy = ty.moving ? tx.wlo * (v3 - v1) + tx.whi * (v4 - v2) : (A)0;
  A dv_dx = tx.moving ? ty.wlo * (v2 - v1) + ty.whi * (v4 - v3) : (A)0;
  A gy = grad * dv_dy * scale, gx = grad * dv_dx * scale;
  A fy = ((A)ph + ((A)iy + (A)0.5) / (A)g.gh) / (A)PH;
  A fx = ((A)pw + ((A)ix + (A)0.5) / (A)g.gw) / (A)PW;
  if (g.unit_w) {
    d[0] += gx;
  } else {
    d[0] += gx * ((A)1 - fx);
    d[2] += gx * fx;
  }
  if (g.unit_h) {
    d[1] += gy;
  } else {
    d[1] += gy * ((A)1 - fy);
    d[3] += gy * fy;
  }
}

// Box gradient, pass 1: one work item per (box k, channel c) sums over the bins of
// that channel and writes partial[4 * (k*C + c) + {0..3}] (x1, y1, x2, y2).
template <class T, class A>
__device__ void roi_align_box_partial(long long n, const T* __restrict__ grad_output, const T* __restrict__ input,
                                      const A* __restrict__ rois, int C, int H, int W, int PH, int PW,
                                      AlignBox<A> box, int sampling_ratio, int mode, A* __restrict__ partial) {
  ROILIB_FOR_EACH(i, n) {
    int c = (int)(i % C);
    long long k = i / C;
    SampleGrid<A> g = box.grid(rois + 5 * k, PH, PW, sampling_ratio);
    const T* plane = input + ((long long)g.batch * C + c) * H * W;
    const T* go = grad_output + i * PH * PW;
    A d[4] = {0, 0, 0, 0};
    for (int ph = 0; ph < PH && g.valid; ++ph) {
      for (int pw = 0; pw < PW; ++pw) {
        A grad = to_acc(go[ph * PW + pw]);
        if (mode == ROILIB_MAX) {
          int s;
          bin_max(plane, H, W, g, ph, pw, &s);
          if (s >= 0) add_box_gradient(plane, H, W, g, box.scale, PH, PW, ph, pw, s / g.gw, s % g.gw, grad, d);
        } else {
          grad = grad / g.count;
          for (int iy = 0; iy < g.gh; ++iy)
            for (int ix = 0; ix < g.gw; ++ix) add_box_gradient(plane, H, W, g, box.scale, PH, PW, ph, pw, iy, ix, grad, d);
        }
      }
    }
    for (int j = 0; j < 4; ++j) partial[4 * i + j] = d[j];
  }
}

// Box gradient, pass 2: one work item per (box k, column j) of the (K, 5) result sums
// the channels' partials in channel order (deterministic); column 0, the batch
// index, gets 0.
template <class A>
__device__ void roi_align_box_reduce(long long n, const A* __restrict__ partial, int C, A* __restrict__ grad_rois) {
  ROILIB_FOR_EACH(i, n) {
    long long k = i / 5;
    int j = (int)(i % 5);
    A sum = 0;
    if (j > 0)
      for (int c = 0; c < C; ++c) sum += partial[4 * (k * C + c) + (j - 1)];
    grad_rois[i] = sum;
  }
}

// extern "C" entry points, one set per dtype. rois are (K, 5) in the arithmetic type A;
// gradients are written in A (the host casts float32 back to float16). N is the number
// of images (for roi_is_valid).
#define ROILIB_ALIGN_BOX(A) AlignBox<A>{scale, aligned != 0, N}
#define ROI_ALIGN_ENTRY_POINTS(SUFFIX, T, A)                                                                          \
  extern "C" __global__ void roi_align_forward_##SUFFIX(long long n, const T* __restrict__ input,                     \
                                                        const A* __restrict__ rois, int N, int C, int H, int W,       \
                                                        int PH, int PW, A scale, int sampling_ratio, int aligned,     \
                                                        int mode, T* __restrict__ output) {                           \
    sampled_forward<T, A>(n, input, rois, C, H, W, PH, PW, ROILIB_ALIGN_BOX(A), sampling_ratio, mode, output);           \
  }                                                                                                                   \
  extern "C" __global__ void roi_align_argmax_##SUFFIX(long long n, const T* __restrict__ input,                      \
                                                       const A* __restrict__ rois, int N, int C, int H, int W,        \
                                                       int PH, int PW, A scale, int sampling_ratio, int aligned,      \
                                                       int* __restrict__ winner) {                                    \
    sampled_argmax<T, A>(n, input, rois, C, H, W, PH, PW, ROILIB_ALIGN_BOX(A), sampling_ratio, winner);                  \
  }                                                                                                                   \
  extern "C" __global__ void roi_align_backward_atomic_##SUFFIX(                                                      \
      long long n, const T* __restrict__ grad_output, const T* __restrict__ input, const A* __restrict__ rois, int N, \
      int C, int H, int W, int PH, int PW, A scale, int sampling_ratio, int aligned, int mode,                        \
      A* __restrict__ grad_input) {                                                                                   \
    sampled_backward_atomic<T, A>(n, grad_output, input, rois, C, H, W, PH, PW, ROILIB_ALIGN_BOX(A), sampling_ratio,     \
                                  mode, grad_input);                                                                  \
  }                                                                                                                   \
  extern "C" __global__ void roi_align_ranges_##SUFFIX(long long n, const A* __restrict__ rois, int N, int H, int W,  \
                                                       int PH, int PW, A scale, int sampling_ratio, int aligned,      \
                                                       int* __restrict__ ranges) {                                    \
    sampled_ranges<A>(n, rois, H, W, PH, PW, ROILIB_ALIGN_BOX(A), sampling_ratio, ranges);                               \
  }                                                                                                                   \
  extern "C" __global__ void roi_align_backward_tiles_##SUFFIX(                                                       \
      long long n, const T* __restrict__ grad_output, const A* __restrict__ rois, const int* __restrict__ lists,      \
      const int* __restrict__ cumsum, const int* __restrict__ winner, int K, int N, int C, int H, int W, int PH,      \
      int PW, A scale, int sampling_ratio, int aligned, int mode, int ts, int cg, int TY, int TX,                             \
      A* __restrict__ grad_input) {                                                                                   \
    sampled_backward_tiles<T, A>(n, grad_output, rois, lists, cumsum, winner, K, C, H, W, PH, PW, ROILIB_ALIGN_BOX(A),   \
                                 sampling_ratio, mode, ts, cg, TY, TX, grad_input);                                       \
  }                                                                                                                   \
  extern "C" __global__ void roi_align_box_partial_##SUFFIX(                                                          \
      long long n, const T* __restrict__ grad_output, const T* __restrict__ input, const A* __restrict__ rois, int N, \
      int C, int H, int W, int PH, int PW, A scale, int sampling_ratio, int aligned, int mode,                        \
      A* __restrict__ partial) {                                                                                      \
    roi_align_box_partial<T, A>(n, grad_output, input, rois, C, H, W, PH, PW, ROILIB_ALIGN_BOX(A), sampling_ratio, mode, \
                                partial);                                                                             \
  }                                                                                                                   \
  extern "C" __global__ void roi_align_box_reduce_##SUFFIX(long long n, const A* __restrict__ partial, int C,         \
                                                           A* __restrict__ grad_rois) {                               \
    roi_align_box_reduce<A>(n, partial, C, grad_rois);                                                                \
  }

ROI_ALIGN_ENTRY_POINTS(f16, __half, float)
ROI_ALIGN_ENTRY_POINTS(f32, float, float)
ROI_ALIGN_ENTRY_POINTS(f64, double, double)
