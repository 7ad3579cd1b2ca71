// The part of ONNX Runtime's C ABI that edgetok's custom operators use, declared here.
//
// Why declarations of our own: the onnxruntime wheel ships no headers, and this ABI is stable by
// design — OrtApi is a table of function pointers that only ever grows at its end, and a library
// built against an older layout runs on every newer runtime (GetApi(version) hands out the same
// table). So a custom-op library needs only the slots it calls, at their positions in the table,
// and the OrtCustomOp struct it fills. Positions are those of onnxruntime_c_api.h (MIT), counted
// from its first member; tests/kernels/test_ort_ops.py runs every slot used here on the installed
// runtime, so a wrong position fails there, not in a user's session.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

struct OrtStatus;
struct OrtValue;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtTensorTypeAndShapeInfo;
struct OrtOpAttr;
struct OrtOp;

enum OrtErrorCode { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };

enum OrtTensorElementType {  // ONNXTensorElementDataType: the ONNX TensorProto numbering
  ORT_ELEMENT_UNDEFINED = 0,
  ORT_ELEMENT_FLOAT = 1,
  ORT_ELEMENT_UINT8 = 2,
  ORT_ELEMENT_INT32 = 6,
  ORT_ELEMENT_INT64 = 7,
};

enum OrtOpAttrType { ORT_OP_ATTR_INT = 1, ORT_OP_ATTR_FLOAT = 3 };

enum OrtCharacteristic { ORT_INPUT_OUTPUT_REQUIRED = 0 };  // OrtCustomOpInputOutputCharacteristic
enum OrtMemoryType { ORT_MEM_DEFAULT = 0 };                 // OrtMemType

// The OrtApi slots used, by position (each slot is one function pointer).
namespace ort_slot {
constexpr size_t CreateStatus = 0;
constexpr size_t GetErrorMessage = 2;
constexpr size_t KernelInfoGetAttribute_float = 85;
constexpr size_t CreateCustomOpDomain = 26;
constexpr size_t CustomOpDomain_Add = 27;
constexpr size_t AddCustomOpDomain = 28;
constexpr size_t GetTensorMutableData = 51;
constexpr size_t GetDimensionsCount = 61;
constexpr size_t GetDimensions = 62;
constexpr size_t GetTensorTypeAndShape = 65;
constexpr size_t KernelInfoGetAttribute_int64 = 86;
constexpr size_t KernelContext_GetInput = 90;
constexpr size_t KernelContext_GetOutput = 91;
constexpr size_t ReleaseStatus = 93;
constexpr size_t ReleaseTensorTypeAndShapeInfo = 99;
constexpr size_t CreateOpAttr = 211;
constexpr size_t ReleaseOpAttr = 212;
constexpr size_t CreateOp = 213;
constexpr size_t InvokeOp = 214;
constexpr size_t ReleaseOp = 215;
constexpr size_t KernelContext_ParallelFor = 274;
}  // namespace ort_slot

// The API version whose table holds every slot above (KernelContext_ParallelFor: 1.17).
constexpr uint32_t ORT_API_VERSION_NEEDED = 17;

struct OrtApi;  // opaque: read through OrtFunctions below

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// OrtCustomOp, up to the members of version 16 (ONNX Runtime reads no further for that version).
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  OrtTensorElementType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  OrtTensorElementType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* kernel);
  OrtCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtMemoryType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* context);
};
constexpr uint32_t ORT_CUSTOM_OP_VERSION = 16;

}  // extern "C"

// The operators of the library (each file defines its own), for RegisterCustomOps (ort_ops.cpp).
const OrtCustomOp* edgetok_matmul_q4_op(const OrtApi* api);
const OrtCustomOp* edgetok_attention_op(const OrtApi* api);
const char* edgetok_matmul_q4_isa();

// Typed access to the slots used: one place that says what each slot's function takes.
struct OrtFunctions {
  explicit OrtFunctions(const OrtApi* api) : table(reinterpret_cast<void* const*>(api)) {}

  OrtStatus* status(OrtErrorCode code, const char* message) const {
    return call<OrtStatus* (*)(OrtErrorCode, const char*)>(ort_slot::CreateStatus)(code, message);
  }
  OrtStatus* create_domain(const char* name, OrtCustomOpDomain** out) const {
    return call<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(ort_slot::CreateCustomOpDomain)(name, out);
  }
  OrtStatus* domain_add(OrtCustomOpDomain* domain, const OrtCustomOp* op) const {
    return call<OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*)>(ort_slot::CustomOpDomain_Add)(domain, op);
  }
  OrtStatus* add_domain(OrtSessionOptions* options, OrtCustomOpDomain* domain) const {
    return call<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(ort_slot::AddCustomOpDomain)(options, domain);
  }
  OrtStatus* data(const OrtValue* value, void** out) const {
    return call<OrtStatus* (*)(const OrtValue*, void**)>(ort_slot::GetTensorMutableData)(value, out);
  }
  OrtStatus* shape_info(const OrtValue* value, OrtTensorTypeAndShapeInfo** out) const {
    return call<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(ort_slot::GetTensorTypeAndShape)(value, out);
  }
  OrtStatus* rank(const OrtTensorTypeAndShapeInfo* info, size_t* out) const {
    return call<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(ort_slot::GetDimensionsCount)(info, out);
  }
  OrtStatus* dims(const OrtTensorTypeAndShapeInfo* info, int64_t* out, size_t n) const {
    return call<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(ort_slot::GetDimensions)(info, out, n);
  }
  void release(OrtTensorTypeAndShapeInfo* info) const {
    call<void (*)(OrtTensorTypeAndShapeInfo*)>(ort_slot::ReleaseTensorTypeAndShapeInfo)(info);
  }
  void release(OrtStatus* status) const { call<void (*)(OrtStatus*)>(ort_slot::ReleaseStatus)(status); }
  OrtStatus* attribute(const OrtKernelInfo* info, const char* name, float* out) const {
    return call<OrtStatus* (*)(const OrtKernelInfo*, const char*, float*)>(ort_slot::KernelInfoGetAttribute_float)(info, name, out);
  }
  OrtStatus* attribute(const OrtKernelInfo* info, const char* name, int64_t* out) const {
    return call<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(ort_slot::KernelInfoGetAttribute_int64)(info, name, out);
  }
  OrtStatus* input(const OrtKernelContext* context, size_t index, const OrtValue** out) const {
    return call<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(ort_slot::KernelContext_GetInput)(context, index, out);
  }
  OrtStatus* output(OrtKernelContext* context, size_t index, const int64_t* dims, size_t n, OrtValue** out) const {
    return call<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(ort_slot::KernelContext_GetOutput)(
        context, index, dims, n, out);
  }
  // one of ONNX Runtime's own operators, run from inside a kernel (edgetok's ops hand it the cases
  // they do not specialize)
  OrtStatus* create_attr(const char* name, const void* data, int len, OrtOpAttrType type, OrtOpAttr** out) const {
    return call<OrtStatus* (*)(const char*, const void*, int, OrtOpAttrType, OrtOpAttr**)>(ort_slot::CreateOpAttr)(name, data, len, type, out);
  }
  void release(OrtOpAttr* attr) const { call<void (*)(OrtOpAttr*)>(ort_slot::ReleaseOpAttr)(attr); }
  OrtStatus* create_op(const OrtKernelInfo* info, const char* name, const char* domain, int version, const char** constraint_names,
                       const OrtTensorElementType* constraint_types, int constraints, const OrtOpAttr* const* attrs, int n_attrs,
                       int inputs, int outputs, OrtOp** out) const {
    return call<OrtStatus* (*)(const OrtKernelInfo*, const char*, const char*, int, const char**, const OrtTensorElementType*, int,
                               const OrtOpAttr* const*, int, int, int, OrtOp**)>(ort_slot::CreateOp)(
        info, name, domain, version, constraint_names, constraint_types, constraints, attrs, n_attrs, inputs, outputs, out);
  }
  OrtStatus* invoke(const OrtKernelContext* context, const OrtOp* op, const OrtValue* const* inputs, int n_inputs,
                    OrtValue* const* outputs, int n_outputs) const {
    return call<OrtStatus* (*)(const OrtKernelContext*, const OrtOp*, const OrtValue* const*, int, OrtValue* const*, int)>(
        ort_slot::InvokeOp)(context, op, inputs, n_inputs, outputs, n_outputs);
  }
  void release(OrtOp* op) const { call<void (*)(OrtOp*)>(ort_slot::ReleaseOp)(op); }
  // fn(user, i) for i in [0, total) on the session's intra-op threads (this one included)
  OrtStatus* parallel_for(const OrtKernelContext* context, void (*fn)(void*, size_t), size_t total, void* user) const {
    return call<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(
        ort_slot::KernelContext_ParallelFor)(context, fn, total, 0, user);
  }

 private:
  template <typename F>
  F call(size_t slot) const { return reinterpret_cast<F>(table[slot]); }
  void* const* table;
};

#define ORT_RETURN_IF_ERROR(expr)              \
  do {                                         \
    if (OrtStatus* s_ = (expr)) return s_;     \
  } while (0)

// An OrtCustomOp for a CPU kernel with float outputs: Create / Compute (the status-returning forms of
// version 16) do the work, the older void forms wrap them; every input and output required.
template <OrtStatus* (*Create)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**),
          OrtStatus* (*Compute)(void*, OrtKernelContext*), void (*Destroy)(void*)>
OrtCustomOp cpu_op(const char* (*name)(const OrtCustomOp*), OrtTensorElementType (*input_type)(const OrtCustomOp*, size_t),
                   size_t (*inputs)(const OrtCustomOp*), size_t (*outputs)(const OrtCustomOp*)) {
  OrtCustomOp op{};
  op.version = ORT_CUSTOM_OP_VERSION;
  op.CreateKernel = [](const OrtCustomOp* o, const OrtApi* api, const OrtKernelInfo* info) -> void* {
    void* kernel = nullptr;
    (void)Create(o, api, info, &kernel);
    return kernel;
  };
  op.GetName = name;
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CPUExecutionProvider"; };
  op.GetInputType = input_type;
  op.GetInputTypeCount = inputs;
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return ORT_ELEMENT_FLOAT; };
  op.GetOutputTypeCount = outputs;
  op.KernelCompute = [](void* kernel, OrtKernelContext* context) { (void)Compute(kernel, context); };
  op.KernelDestroy = Destroy;
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return ORT_INPUT_OUTPUT_REQUIRED; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return ORT_INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return ORT_MEM_DEFAULT; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.CreateKernelV2 = Create;
  op.KernelComputeV2 = Compute;
  return op;
}
