// Runs `main` of a Relax library exported by graphprune, on float32 or int64 inputs read from files.
// Cross-compiled for aarch64 and run under qemu-aarch64, it checks ARM builds for correctness
// on an x86 machine (timing under emulation means nothing).
//
//   vm_driver LIB.so OUT_PREFIX IN0.bin:D0,D1,...[:int64] [IN1.bin:...]
// (inputs are float32 unless their spec ends in ":int64", e.g. token ids)
// prints one line per output, "output <i> <d0,d1,...>", and writes OUT_PREFIX<i>.bin (float32).
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct HostAlloc {
  void AllocData(DLTensor* t) { t->data = std::malloc(ffi::GetDataSize(*t)); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

constexpr DLDevice kCPU{kDLCPU, 0};
constexpr DLDataType kFloat32{kDLFloat, 32, 1};
constexpr DLDataType kInt64{kDLInt, 64, 1};
constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR

ffi::Tensor ReadInput(std::string spec) {
  DLDataType dtype = kFloat32;
  size_t colon = spec.rfind(':');
  if (spec.substr(colon + 1) == "int64") {
    dtype = kInt64;
    spec = spec.substr(0, colon);
    colon = spec.rfind(':');
  }
  std::vector<int64_t> shape;
  std::stringstream dims(spec.substr(colon + 1));
  for (std::string d; std::getline(dims, d, ',');) shape.push_back(std::stoll(d));
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(HostAlloc(), ffi::Shape(shape), dtype, kCPU);
  std::ifstream in(spec.substr(0, colon), std::ios::binary);
  in.read(static_cast<char*>(tensor.data_ptr()), ffi::GetDataSize(tensor));
  if (!in) throw std::runtime_error("cannot read input " + spec);
  return tensor;
}

void WriteOutputs(const ffi::Any& value, const std::string& prefix, int* index) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    std::cout << "output " << *index;
    const char* sep = " ";
    for (int64_t d : tensor->shape()) { std::cout << sep << d; sep = ","; }
    std::cout << "\n";
    std::ofstream out(prefix + std::to_string((*index)++) + ".bin", std::ios::binary);
    out.write(static_cast<const char*>(tensor->data_ptr()), ffi::GetDataSize(*tensor));
  } else {
    for (const ffi::Any& item : value.cast<ffi::Array<ffi::Any>>()) WriteOutputs(item, prefix, index);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: vm_driver LIB.so OUT_PREFIX IN.bin:D0,D1,... ...\n";
    return 2;
  }
  ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  ffi::Function entry = vm->GetFunction("main").value();

  std::vector<ffi::Tensor> inputs;
  for (int i = 3; i < argc; ++i) inputs.push_back(ReadInput(argv[i]));
  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  ffi::Any result;
  entry.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
  int index = 0;
  WriteOutputs(result, argv[2], &index);
  return 0;
}
