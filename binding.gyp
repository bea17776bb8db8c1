{
  "variables": {
    "expertd_gloo%": "<!(node native/comm/gloo-probe.cjs)"
  },
  "targets": [
    {
      "target_name": "expertd",
      "sources": [
        "native/addon/addon.cc",
        "native/addon/handles.cc",
        "native/addon/bind_core.cc",
        "native/addon/bind_gemm.cc",
        "native/addon/bind_ops.cc",
        "native/addon/bind_attention.cc",
        "native/addon/bind_io.cc",
        "native/addon/bind_comm.cc",
        "native/addon/bind_loader.cc",
        "native/addon/bind_sampling.cc",
        "native/addon/bind_deltanet.cc",
        "native/cpu/thread_pool.cc",
        "native/cpu/cpu_features.cc",
        "native/cpu/weights.cc",
        "native/cpu/weight_memory.cc",
        "native/cpu/quant.cc",
        "native/cpu/dense_gemm.cc",
        "native/cpu/group_gemm.cc",
        "native/cpu/routing.cc",
        "native/cpu/permute.cc",
        "native/cpu/norm.cc",
        "native/cpu/rope.cc",
        "native/cpu/activation.cc",
        "native/cpu/embedding.cc",
        "native/cpu/softmax.cc",
        "native/cpu/attention.cc",
        "native/cpu/expert_loader.cc",
        "native/cpu/sampling.cc",
        "native/cpu/deltanet.cc",
        "native/comm/loopback.cc",
        "native/comm/gloo.cc",
        "native/comm/comm_queue.cc",
        "native/io/mmap_file.cc"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "native/include"
      ],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions", "-O2"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-O2", "-std=gnu++17"],
      "cflags": ["-O3", "-fPIC", "-fno-strict-aliasing"],
      "cflags_cc": ["-std=c++17", "-O3", "-fexceptions", "-frtti", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "libraries": ["-lpthread"],
      "conditions": [
        ["expertd_gloo==1", {
          "defines": ["EXPERTD_HAVE_GLOO"],
          "libraries": ["-lgloo"]
        }]
      ],
      "xcode_settings": {
        "GCC_ENABLE_CPP_EXCEPTIONS": "YES",
        "CLANG_CXX_LANGUAGE_STANDARD": "c++17",
        "OTHER_CPLUSPLUSFLAGS": ["-O3"]
      }
    }
  ]
}
