// edgetok's ONNX Runtime operators: a shared library that ONNX Runtime loads
// (SessionOptions.register_custom_ops_library; kernels/ort_ops.py) for graphs that use the domain
// "ai.edgetok": MatMulQ4 (q4_matmul.cpp) and GroupQueryAttention (attention_op.cpp).
#include <initializer_list>

#include "ort_abi.h"

extern "C" {

// ONNX Runtime's entry point for a custom-op library.
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
    const OrtApi* api = base->GetApi(ORT_API_VERSION_NEEDED);
    if (!api) return nullptr;  // an ONNX Runtime older than 1.17: it cannot run these graphs, and says so at load
    OrtFunctions ort(api);
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* s = ort.create_domain("ai.edgetok", &domain)) return s;
    for (const OrtCustomOp* op : {edgetok_matmul_q4_op(api), edgetok_attention_op(api)})
        if (op)  // (an operator this CPU cannot run is not offered)
            if (OrtStatus* s = ort.domain_add(domain, op)) return s;
    return ort.add_domain(options, domain);
}

// Which loops MatMulQ4 runs on this CPU (ort_ops.isa(): `edgetok devices`, the tests).
__attribute__((visibility("default"))) const char* edgetok_q4_isa() { return edgetok_matmul_q4_isa(); }

}  // extern "C"
