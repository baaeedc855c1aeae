// AVX-512 CPU kernels for the bfloat16 elementwise ops of a training step:
// AddV2, AddN, Relu and ReluGrad.
//
// TensorFlow's own kernels for these ops are Eigen's, compiled for the
// wheel's baseline instruction set (AVX), which converts bfloat16 to float
// and back 8 elements at a time; under --mixed-precision they take as long
// as their float32 versions, with half the bytes to move
// (docs/benchmarks.md). These kernels do the same arithmetic 16 elements at a
// time and give Eigen's results bit for bit (but for the sign of a NaN):
// widen to float32, compute, round to nearest even after every operation;
// the last n % 8 elements, which Eigen leaves to its scalar code, go to the
// same scalar code here; AddN sums its inputs in TensorFlow's order. They
// are registered for the stock ops at a higher priority, so a graph keeps its
// standard ops (a SavedModel exported from the trained model is unchanged,
// and TF Serving runs it with its own kernels) while this process runs them
// here. AddV2 with broadcasting goes to TensorFlow's own BinaryOp code,
// compiled into this library.
//
// The vector loops are compiled for AVX-512 through function attributes, the
// rest for the wheel's AVX; the Python side (pipeline/kernels/bfloat16.py)
// loads the library only on a CPU with AVX-512.

#define EIGEN_USE_THREADS

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/kernels/cwise_ops_common.h"

namespace tensorflow {
namespace {

using bfloat16 = Eigen::bfloat16;
using CPUDevice = Eigen::ThreadPoolDevice;

#define ACCRESNET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// Elements per unit of work handed to the intra-op thread pool: a multiple of
// 16, so that only the tensor's last chunk has a remainder.
constexpr int64_t kChunk = 1 << 14;
constexpr __mmask16 kAll = 0xffff, kHalf = 0x00ff;

// How many times each kernel ran here (not in TensorFlow's code): what the
// AccresnetBfloat16KernelCalls op reads, so that a test can see them run.
enum Kernel { kAddV2, kAddN, kRelu, kReluGrad, kKernels };
std::atomic<int64_t> calls[kKernels];

const uint16_t* bits(const Tensor& tensor) {
  return reinterpret_cast<const uint16_t*>(tensor.flat<bfloat16>().data());
}
uint16_t* bits(Tensor* tensor) { return reinterpret_cast<uint16_t*>(tensor->flat<bfloat16>().data()); }
const bfloat16* values(const Tensor& tensor) { return tensor.flat<bfloat16>().data(); }
bfloat16* values(Tensor* tensor) { return tensor->flat<bfloat16>().data(); }

// The 16 (or, with kHalf, the first 8) bfloat16 values at `in`, as float32.
ACCRESNET_AVX512 inline __m512 widen(const uint16_t* in, __mmask16 lanes) {
  const __m256i raw = _mm256_maskz_loadu_epi16(lanes, in);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Eigen's vectorised float -> bfloat16: round to nearest even; a NaN becomes
// the positive quiet NaN 0x7fc0 (Eigen's scalar conversion keeps a NaN's
// sign, which IEEE 754 leaves unspecified).
ACCRESNET_AVX512 inline __m256i narrow(__m512 x) {
  const __m512i raw = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(raw, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(raw, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// x rounded to bfloat16 and widened again: what a bfloat16 intermediate holds.
ACCRESNET_AVX512 inline __m512 round_trip(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(narrow(x)), 16));
}

ACCRESNET_AVX512 inline void store(uint16_t* out, __m512 x, __mmask16 lanes) {
  _mm256_mask_storeu_epi16(out, lanes, narrow(x));
}

// Runs body(i, lanes) over [begin, end) in vectors of 16, then one of 8 where
// 8 or more are left (Eigen's AVX vectors hold 8), and returns where the
// scalar remainder (fewer than 8) starts.
template <typename Body>
ACCRESNET_AVX512 inline int64_t vectors(int64_t i, int64_t end, Body body) {
  for (; i + 16 <= end; i += 16) body(i, kAll);
  if (i + 8 <= end) {
    body(i, kHalf);
    i += 8;
  }
  return i;
}

ACCRESNET_AVX512 int64_t add_vectors(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t begin,
                                     int64_t end) {
  return vectors(begin, end, [&](int64_t i, __mmask16 lanes) ACCRESNET_AVX512 {
    store(out + i, _mm512_add_ps(widen(a + i, lanes), widen(b + i, lanes)), lanes);
  });
}

// The sum of in[first], in[first + 1], ... left to right, each partial sum
// rounded to bfloat16 (an Eigen expression a + b + c of bfloat16 tensors).
ACCRESNET_AVX512 inline __m512 sum_in_order(const std::vector<const uint16_t*>& in, size_t first, size_t last,
                                            int64_t i, __mmask16 lanes) {
  __m512 sum = widen(in[first] + i, lanes);
  for (size_t k = first + 1; k < last; ++k) sum = round_trip(_mm512_add_ps(sum, widen(in[k] + i, lanes)));
  return sum;
}

// TensorFlow's AddN: the first `head` inputs summed, then each further 8
// summed on their own and added to the total (out += in1 + ... + in8).
ACCRESNET_AVX512 int64_t add_n_vectors(const std::vector<const uint16_t*>& in, size_t head, uint16_t* out,
                                       int64_t begin, int64_t end) {
  return vectors(begin, end, [&](int64_t i, __mmask16 lanes) ACCRESNET_AVX512 {
    __m512 total = sum_in_order(in, 0, head, i, lanes);
    for (size_t group = head; group < in.size(); group += 8) {
      total = round_trip(_mm512_add_ps(total, sum_in_order(in, group, group + 8, i, lanes)));
    }
    store(out + i, total, lanes);
  });
}

// Eigen: max(features, 0) propagating NaN, vectorised as max(0, x).
ACCRESNET_AVX512 int64_t relu_vectors(const uint16_t* x, uint16_t* out, int64_t begin, int64_t end) {
  return vectors(begin, end, [&](int64_t i, __mmask16 lanes) ACCRESNET_AVX512 {
    store(out + i, _mm512_max_ps(_mm512_setzero_ps(), widen(x + i, lanes)), lanes);
  });
}

// Eigen: gradients * (features > 0), the comparison cast to 0 or 1.
ACCRESNET_AVX512 int64_t relu_grad_vectors(const uint16_t* gradients, const uint16_t* features, uint16_t* out,
                                           int64_t begin, int64_t end) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  return vectors(begin, end, [&](int64_t i, __mmask16 lanes) ACCRESNET_AVX512 {
    const __mmask16 positive = _mm512_cmp_ps_mask(widen(features + i, lanes), zero, _CMP_GT_OQ);
    store(out + i, _mm512_mul_ps(widen(gradients + i, lanes), _mm512_maskz_mov_ps(positive, one)), lanes);
  });
}

// Runs work(begin, end) over [0, size) in chunks on the intra-op threads.
template <typename Work>
void for_chunks(OpKernelContext* context, int64_t size, Work work) {
  const int64_t chunks = (size + kChunk - 1) / kChunk;
  context->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      chunks, kChunk * 4, [&](int64_t first, int64_t last) {
        work(first * kChunk, std::min(size, last * kChunk));
      });
}

class AddV2Kernel : public BinaryOp<CPUDevice, functor::add<bfloat16>> {
 public:
  using Stock = BinaryOp<CPUDevice, functor::add<bfloat16>>;
  explicit AddV2Kernel(OpKernelConstruction* context) : Stock(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& a = context->input(0);
    const Tensor& b = context->input(1);
    if (a.shape() != b.shape()) return Stock::Compute(context);  // broadcasting
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0, 1}, 0, a.shape(), &out));
    calls[kAddV2]++;
    for_chunks(context, a.NumElements(), [&](int64_t begin, int64_t end) {
      for (int64_t i = add_vectors(bits(a), bits(b), bits(out), begin, end); i < end; ++i) {
        values(out)[i] = values(a)[i] + values(b)[i];
      }
    });
  }
};

class AddNKernel : public OpKernel {
 public:
  explicit AddNKernel(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const int count = context->num_inputs();
    const Tensor& first = context->input(0);
    for (int k = 1; k < count; ++k) {
      OP_REQUIRES(context, context->input(k).shape() == first.shape(),
                  errors::InvalidArgument("AddN: inputs must have the same shape: input 0 is ",
                                          first.shape().DebugString(), ", input ", k, " is ",
                                          context->input(k).shape().DebugString()));
    }
    if (count == 1) {
      context->set_output(0, first);
      return;
    }
    // As TensorFlow's AddN: the first input whose buffer can be reused holds the
    // sum, and moves to the front of the order.
    std::vector<int> order(count);
    for (int k = 0; k < count; ++k) order[k] = k;
    Tensor* out = nullptr;
    int reused = -1;
    for (int k = 0; k < count && reused < 0; ++k) {
      if (context->forward_input_to_output_with_shape(k, 0, first.shape(), &out)) reused = k;
    }
    if (reused < 0) {
      OP_REQUIRES_OK(context, context->allocate_output(0, first.shape(), &out));
    } else {
      std::swap(order[0], order[reused]);
    }
    // TensorFlow sums count % 8 inputs first (8 or 9 where that is 0 or 1), then groups of 8.
    const size_t head = count % 8 == 0 ? 8 : count % 8 == 1 ? 9 : count % 8;
    std::vector<const uint16_t*> in(count);
    std::vector<const bfloat16*> scalar_in(count);
    for (int k = 0; k < count; ++k) {
      in[k] = bits(context->input(order[k]));
      scalar_in[k] = values(context->input(order[k]));
    }
    calls[kAddN]++;
    for_chunks(context, first.NumElements(), [&](int64_t begin, int64_t end) {
      // Two inputs (the gradient sums of a step): one rounding, as AddV2.
      const int64_t rest = count == 2 ? add_vectors(in[0], in[1], bits(out), begin, end)
                                      : add_n_vectors(in, head, bits(out), begin, end);
      for (int64_t i = rest; i < end; ++i) {
        bfloat16 total = scalar_in[0][i];
        for (size_t k = 1; k < head; ++k) total = total + scalar_in[k][i];
        for (size_t group = head; group < in.size(); group += 8) {
          bfloat16 partial = scalar_in[group][i];
          for (size_t k = group + 1; k < group + 8; ++k) partial = partial + scalar_in[k][i];
          total = total + partial;
        }
        values(out)[i] = total;
      }
    });
  }
};

class ReluKernel : public OpKernel {
 public:
  explicit ReluKernel(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& features = context->input(0);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, features.shape(), &out));
    calls[kRelu]++;
    for_chunks(context, features.NumElements(), [&](int64_t begin, int64_t end) {
      for (int64_t i = relu_vectors(bits(features), bits(out), begin, end); i < end; ++i) {
        const bfloat16 x = values(features)[i];  // Eigen's scalar max: keeps -0, NaN and (flushed) subnormals
        values(out)[i] = x < bfloat16(0) ? bfloat16(0) : x;
      }
    });
  }
};

class ReluGradKernel : public OpKernel {
 public:
  explicit ReluGradKernel(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& gradients = context->input(0);
    const Tensor& features = context->input(1);
    OP_REQUIRES(context, gradients.shape() == features.shape(),
                errors::InvalidArgument("ReluGrad: gradients and features must have the same shape: ",
                                        gradients.shape().DebugString(), " vs ",
                                        features.shape().DebugString()));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, gradients.shape(), &out));
    calls[kReluGrad]++;
    for_chunks(context, gradients.NumElements(), [&](int64_t begin, int64_t end) {
      for (int64_t i = relu_grad_vectors(bits(gradients), bits(features), bits(out), begin, end); i < end; ++i) {
        values(out)[i] = values(gradients)[i] * static_cast<bfloat16>(values(features)[i] > bfloat16(0));
      }
    });
  }
};

class KernelCallsOp : public OpKernel {
 public:
  explicit KernelCallsOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({kKernels}), &out));
    for (int k = 0; k < kKernels; ++k) out->vec<int64_t>()(k) = calls[k].load();
  }
};

// Priority 1 beats the stock kernels' 0 for the same op, device and type.
REGISTER_KERNEL_BUILDER(Name("AddV2").Device(DEVICE_CPU).TypeConstraint<bfloat16>("T").Priority(1), AddV2Kernel);
REGISTER_KERNEL_BUILDER(Name("AddN").Device(DEVICE_CPU).TypeConstraint<bfloat16>("T").Priority(1), AddNKernel);
REGISTER_KERNEL_BUILDER(Name("Relu").Device(DEVICE_CPU).TypeConstraint<bfloat16>("T").Priority(1), ReluKernel);
REGISTER_KERNEL_BUILDER(Name("ReluGrad").Device(DEVICE_CPU).TypeConstraint<bfloat16>("T").Priority(1),
                        ReluGradKernel);

// The calls of [AddV2, AddN, Relu, ReluGrad] this process ran here.
REGISTER_OP("AccresnetBfloat16KernelCalls").Output("calls: int64").SetIsStateful();
REGISTER_KERNEL_BUILDER(Name("AccresnetBfloat16KernelCalls").Device(DEVICE_CPU), KernelCallsOp);

}  // namespace
}  // namespace tensorflow
