// safetensors reading (memory-mapped, single file or sharded) and writing (atomic: temp file + rename).
//
// File = u64 LE header length N ‖ N bytes of JSON ‖ data buffer. Each JSON entry:
//   name → {"dtype": "BF16", "shape": [d0, ...], "data_offsets": [begin, end]}   (offsets relative to the buffer)
// Every malformed or hostile input raises moedit::InputError naming the file and the tensor.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/half.h"  // bf16/f16/fp8 ↔ fp32

namespace moedit {

enum class DType { F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL, F8_E4M3 };

size_t dtype_size(DType dt);
const char* dtype_name(DType dt);
// Parses "BF16" etc.; throws InputError (mentioning `where`) for anything else.
DType parse_dtype(const std::string& s, const std::string& where);

// A view into mapped memory; valid while its file lives.
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  std::string file;  // for error messages

  int64_t numel() const;
  // Converts to fp32 (F32, F16, BF16, F64, F8_E4M3, integer types). out must hold numel() floats.
  void to_f32(float* out) const;
  std::vector<float> to_f32() const;
};

// One memory-mapped .safetensors file.
class SafeTensorsFile {
 public:
  static constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // 100 MB, as the reference parser
  static constexpr size_t kMaxTensors = 1u << 20;

  explicit SafeTensorsFile(const std::string& path);
  ~SafeTensorsFile();
  SafeTensorsFile(const SafeTensorsFile&) = delete;
  SafeTensorsFile& operator=(const SafeTensorsFile&) = delete;

  const std::string& path() const { return path_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorView& get(const std::string& name) const;  // InputError if absent
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  size_t size() const { return map_size_; }
  // Locks the whole mapping in RAM (mlock; pages are read in now). Throws std::runtime_error saying why it failed.
  void lock() const;

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint folder: model.safetensors, or model.safetensors.index.json + shards.
class TensorStore {
 public:
  // `path` is a folder or a single .safetensors file.
  explicit TensorStore(const std::string& path);
  bool has(const std::string& name) const;
  const TensorView& get(const std::string& name) const;  // InputError naming the tensor if missing
  std::vector<std::string> names() const;
  const std::vector<std::unique_ptr<SafeTensorsFile>>& files() const { return files_; }

 private:
  std::vector<std::unique_ptr<SafeTensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
};

// An owned tensor to write.
struct OwnedTensor {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
OwnedTensor make_f32_tensor(const std::vector<int64_t>& shape, const float* data);
// Converts fp32 data to dtype (F32, F16, BF16 with round-to-nearest-even).
OwnedTensor make_tensor(DType dtype, const std::vector<int64_t>& shape, const float* data);

// Writes a safetensors file atomically (path + ".tmp.<pid>" then rename). Tensors are sorted by name; the data buffer
// starts 8-byte aligned (header padded with spaces).
void write_safetensors(const std::string& path, const std::map<std::string, OwnedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});


}  // namespace moedit
