// AVX-512 CPU kernels for the bfloat16 elementwise ops of a training step:
// AddV2, AddN, Relu and ReluGrad.
//
// TensorFlow's own kernels for these ops are Eigen's, compiled for the
// wheel's baseline instruction set, which converts bfloat16 to float and back
// a few elements at a time; under --mixed-precision they take as long as
// their float32 versions, with half the bytes to move (docs/benchmarks.md).
// These kernels do the same arithmetic 16 elements at a time: widen to
// float32, compute, round to nearest even (NaN stays NaN), as Eigen does, so
// their results are bit for bit Eigen's (but for the sign of a NaN). They are registered for the stock
// ops at a higher priority, so a graph keeps its standard ops (a SavedModel
// exported from the trained model is unchanged, and TF Serving runs it with
// its own kernels) while this process runs them here. AddV2 with
// broadcasting, and small tensors, go to TensorFlow's own kernel.
//
// The vector loops are compiled for AVX-512 through function attributes; the
// Python side (pipeline/bfloat16_kernels.py) loads the library only on a CPU
// that has those instructions.

#define EIGEN_USE_THREADS

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/kernels/cwise_ops_common.h"

namespace tensorflow {
namespace {

using bfloat16 = Eigen::bfloat16;
using CPUDevice = Eigen::ThreadPoolDevice;

#define ACCRESNET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// Below this many elements TensorFlow's kernel is as fast (and AddV2 uses it).
constexpr int64_t kSmallTensor = 4096;
// Elements per unit of work handed to the intra-op thread pool.
constexpr int64_t kChunk = 1 << 14;

const uint16_t* bits(const Tensor& tensor) {
  return reinterpret_cast<const uint16_t*>(tensor.flat<bfloat16>().data());
}
uint16_t* bits(Tensor* tensor) { return reinterpret_cast<uint16_t*>(tensor->flat<bfloat16>().data()); }
const bfloat16* values(const Tensor& tensor) { return tensor.flat<bfloat16>().data(); }
bfloat16* values(Tensor* tensor) { return tensor->flat<bfloat16>().data(); }

ACCRESNET_AVX512 inline __m512 widen(const uint16_t* in) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Eigen's vectorised float -> bfloat16: round to nearest even; a NaN becomes
// the positive quiet NaN 0x7fc0 (Eigen's scalar conversion keeps a NaN's sign,
// which IEEE 754 leaves unspecified; the remainders here use that one).
ACCRESNET_AVX512 inline __m256i narrow(__m512 x) {
  const __m512i raw = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(raw, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(raw, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

ACCRESNET_AVX512 inline void store(uint16_t* out, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), narrow(x));
}

// Each loop does the whole vectors of [begin, end) and returns where the
// remainder (fewer than 16 elements) starts.
ACCRESNET_AVX512 int64_t add_vectors(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t i,
                                     int64_t end) {
  for (; i + 16 <= end; i += 16) store(out + i, _mm512_add_ps(widen(a + i), widen(b + i)));
  return i;
}

// Eigen sums left to right with every partial sum rounded to bfloat16.
ACCRESNET_AVX512 int64_t sum_vectors(const std::vector<const uint16_t*>& in, uint16_t* out, int64_t i,
                                     int64_t end) {
  for (; i + 16 <= end; i += 16) {
    __m512 sum = widen(in[0] + i);
    for (size_t k = 1; k < in.size(); ++k) {
      if (k > 1) sum = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(narrow(sum)), 16));
      sum = _mm512_add_ps(sum, widen(in[k] + i));
    }
    store(out + i, sum);
  }
  return i;
}

ACCRESNET_AVX512 int64_t relu_vectors(const uint16_t* x, uint16_t* out, int64_t i, int64_t end) {
  for (; i + 16 <= end; i += 16) store(out + i, _mm512_max_ps(_mm512_setzero_ps(), widen(x + i)));
  return i;
}

// Eigen: gradients * (features > 0), the comparison cast to 0 or 1.
ACCRESNET_AVX512 int64_t relu_grad_vectors(const uint16_t* gradients, const uint16_t* features, uint16_t* out,
                                           int64_t i, int64_t end) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= end; i += 16) {
    const __mmask16 positive = _mm512_cmp_ps_mask(widen(features + i), zero, _CMP_GT_OQ);
    store(out + i, _mm512_mul_ps(widen(gradients + i), _mm512_maskz_mov_ps(positive, one)));
  }
  return i;
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
    if (a.shape() != b.shape() || a.NumElements() < kSmallTensor) return Stock::Compute(context);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0, 1}, 0, a.shape(), &out));
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
    std::vector<int> reusable(count);
    for (int k = 0; k < count; ++k) reusable[k] = k;
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output(reusable, 0, first.shape(), &out));
    std::vector<const uint16_t*> in(count);
    for (int k = 0; k < count; ++k) in[k] = bits(context->input(k));
    for_chunks(context, first.NumElements(), [&](int64_t begin, int64_t end) {
      for (int64_t i = sum_vectors(in, bits(out), begin, end); i < end; ++i) {
        bfloat16 sum = values(context->input(0))[i];
        for (int k = 1; k < count; ++k) sum = sum + values(context->input(k))[i];
        values(out)[i] = sum;
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
    for_chunks(context, features.NumElements(), [&](int64_t begin, int64_t end) {
      for (int64_t i = relu_vectors(bits(features), bits(out), begin, end); i < end; ++i) {
        const bfloat16 x = values(features)[i];  // as the vectors: max(0, x) keeps -0 and NaN
        values(out)[i] = bfloat16(0) > x ? bfloat16(0) : x;
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
    for_chunks(context, gradients.NumElements(), [&](int64_t begin, int64_t end) {
      for (int64_t i = relu_grad_vectors(bits(gradients), bits(features), bits(out), begin, end); i < end; ++i) {
        values(out)[i] = values(gradients)[i] * static_cast<bfloat16>(values(features)[i] > bfloat16(0));
      }
    });
  }
};

// Priority 1 beats the stock kernels' 0 for the same op, device and type.
REGISTER_KERNEL_BUILDER(Name("AddV2").Device(DEVICE_CPU).TypeConstraint<bfloat16>("T").Priority(1), AddV2Kernel);
REGISTER_KERNEL_BUILDER(Name("AddN").Device(DEVICE_CPU).TypeConstraint<bfloat16>("T").Priority(1), AddNKernel);
REGISTER_KERNEL_BUILDER(Name("Relu").Device(DEVICE_CPU).TypeConstraint<bfloat16>("T").Priority(1), ReluKernel);
REGISTER_KERNEL_BUILDER(Name("ReluGrad").Device(DEVICE_CPU).TypeConstraint<bfloat16>("T").Priority(1),
                        ReluGradKernel);

}  // namespace
}  // namespace tensorflow
