#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/errors.h"
#include "io/files.h"

namespace moedit {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct DTypeInfo {
  DType dt;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::F32, "F32", 4}, {DType::F16, "F16", 2}, {DType::BF16, "BF16", 2}, {DType::F64, "F64", 8},
    {DType::I64, "I64", 8}, {DType::I32, "I32", 4}, {DType::I16, "I16", 2},   {DType::I8, "I8", 1},
    {DType::U8, "U8", 1},   {DType::BOOL, "BOOL", 1}, {DType::F8_E4M3, "F8_E4M3", 1},
};

template <typename T>
T load_unaligned(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// out[i] = widen(i-th T stored at p), i < n.
template <typename T, typename F>
void widen_all(const uint8_t* p, int64_t n, float* out, F widen) {
  for (int64_t i = 0; i < n; ++i) out[i] = float(widen(load_unaligned<T>(p + int64_t(sizeof(T)) * i)));
}
const auto as_is = [](auto v) { return v; };

// Stores narrow(data[i]) as the i-th T at p, i < n.
template <typename T, typename F>
void narrow_all(const float* data, int64_t n, uint8_t* p, F narrow) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = narrow(data[i]);
    std::memcpy(p + int64_t(sizeof(T)) * i, &v, sizeof(T));
  }
}

}  // namespace

size_t dtype_size(DType dt) {
  for (const auto& d : kDTypes)
    if (d.dt == dt) return d.size;
  return 0;
}

const char* dtype_name(DType dt) {
  for (const auto& d : kDTypes)
    if (d.dt == dt) return d.name;
  return "?";
}

DType parse_dtype(const std::string& s, const std::string& where) {
  for (const auto& d : kDTypes)
    if (s == d.name) return d.dt;
  throw InputError(where + ": unsupported dtype \"" + s + "\"");
}

// ---- fp16 / bf16 / fp8 ------------------------------------------------------------------------------------------

// ---- TensorView ---------------------------------------------------------------------------------------------

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void TensorView::to_f32(float* out) const {
  const int64_t n = numel();
  const uint8_t* p = data;
  switch (dtype) {
    case DType::F32: std::memcpy(out, p, size_t(n) * 4); break;
    case DType::BF16: widen_all<uint16_t>(p, n, out, bf16_to_f32); break;
    case DType::F16: widen_all<uint16_t>(p, n, out, f16_to_f32); break;
    case DType::F64: widen_all<double>(p, n, out, as_is); break;
    case DType::F8_E4M3: widen_all<uint8_t>(p, n, out, f8e4m3_to_f32); break;
    case DType::I64: widen_all<int64_t>(p, n, out, as_is); break;
    case DType::I32: widen_all<int32_t>(p, n, out, as_is); break;
    case DType::I16: widen_all<int16_t>(p, n, out, as_is); break;
    case DType::I8: widen_all<int8_t>(p, n, out, as_is); break;
    case DType::U8:
    case DType::BOOL: widen_all<uint8_t>(p, n, out, as_is); break;
  }
}

std::vector<float> TensorView::to_f32() const {
  std::vector<float> v(static_cast<size_t>(numel()));
  to_f32(v.data());
  return v;
}

// ---- SafeTensorsFile ------------------------------------------------------------------------------------------

void SafeTensorsFile::lock() const {
  if (::mlock(map_, map_size_) != 0)
    throw std::runtime_error(path_ + ": cannot lock " + std::to_string(map_size_ >> 20) + " MB in RAM (" +
                             std::strerror(errno) + "; see ulimit -l)");
}

SafeTensorsFile::SafeTensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InputError(path + ": not a regular file");
  }
  map_size_ = size_t(st.st_size);
  if (map_size_ < 8) {
    ::close(fd);
    throw InputError(path + ": file too short for a safetensors header (" + std::to_string(map_size_) + " bytes)");
  }
  map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw std::runtime_error(path + ": mmap failed (" + std::strerror(errno) + ")");
  }
  try {
    const uint8_t* base = static_cast<const uint8_t*>(map_);
    const uint64_t n = load_unaligned<uint64_t>(base);  // little-endian hosts only (x86-64, aarch64)
    if (n > kMaxHeaderBytes)
      throw InputError(path + ": header length " + std::to_string(n) + " exceeds the 100 MB limit");
    if (n > map_size_ - 8)
      throw InputError(path + ": header length " + std::to_string(n) + " runs beyond the end of the file (" +
                       std::to_string(map_size_) + " bytes)");
    const char* hdr = reinterpret_cast<const char*>(base + 8);
    json j = json::parse(hdr, hdr + n, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) throw InputError(path + ": header is not valid JSON");
    if (!j.is_object()) throw InputError(path + ": header is not a JSON object");
    if (j.size() > kMaxTensors) throw InputError(path + ": too many tensors (" + std::to_string(j.size()) + ")");
    const uint8_t* buf = base + 8 + n;
    const uint64_t buf_size = map_size_ - 8 - n;
    struct Span {
      uint64_t b, e;
      const std::string* name;
    };
    std::vector<Span> spans;
    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string& name = it.key();
      if (name == "__metadata__") {
        if (!it->is_object()) throw InputError(path + ": __metadata__ is not an object");
        for (auto m = it->begin(); m != it->end(); ++m)
          if (m->is_string()) metadata_[m.key()] = m->get<std::string>();
        continue;
      }
      const std::string where = path + ": tensor '" + name + "'";
      const json& e = *it;
      if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets"))
        throw InputError(where + ": entry must have dtype, shape and data_offsets");
      if (!e["dtype"].is_string()) throw InputError(where + ": dtype is not a string");
      TensorView t;
      t.name = name;
      t.file = path;
      t.dtype = parse_dtype(e["dtype"].get<std::string>(), where);
      if (!e["shape"].is_array()) throw InputError(where + ": shape is not an array");
      uint64_t numel = 1;
      for (const auto& d : e["shape"]) {
        if (!d.is_number_unsigned()) throw InputError(where + ": shape has a non-integer or negative entry");
        uint64_t v = d.get<uint64_t>();
        if (v != 0 && numel > (uint64_t(1) << 62) / v) throw InputError(where + ": shape product overflows");
        numel *= v;
        t.shape.push_back(int64_t(v));
      }
      const auto& off = e["data_offsets"];
      if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
        throw InputError(where + ": data_offsets must be two non-negative integers");
      const uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
      if (en < b) throw InputError(where + ": data_offsets end < begin");
      if (en > buf_size)
        throw InputError(where + ": data_offsets [" + std::to_string(b) + ", " + std::to_string(en) +
                         ") lie outside the data buffer (" + std::to_string(buf_size) + " bytes)");
      const uint64_t expect = numel * dtype_size(t.dtype);
      if (en - b != expect)
        throw InputError(where + ": byte size " + std::to_string(en - b) + " does not match shape x dtype size (" +
                         std::to_string(expect) + ")");
      t.data = buf + b;
      t.nbytes = size_t(en - b);
      auto [pos, ok] = tensors_.emplace(name, std::move(t));
      spans.push_back({b, en, &pos->first});
    }
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& c) { return a.b < c.b; });
    for (size_t i = 1; i < spans.size(); ++i)
      if (spans[i].b < spans[i - 1].e)
        throw InputError(path + ": tensors '" + *spans[i - 1].name + "' and '" + *spans[i].name +
                         "' overlap in the data buffer");
  } catch (...) {
    ::munmap(map_, map_size_);
    map_ = nullptr;
    throw;
  }
}

SafeTensorsFile::~SafeTensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

const TensorView& SafeTensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw InputError(path_ + ": missing tensor '" + name + "'");
  return it->second;
}

// ---- TensorStore ----------------------------------------------------------------------------------------------

TensorStore::TensorStore(const std::string& path) {
  std::vector<std::string> shard_paths;
  if (fs::is_regular_file(path)) {
    shard_paths.push_back(path);
  } else if (fs::is_directory(path)) {
    const fs::path dir(path);
    if (fs::exists(dir / "model.safetensors.index.json")) {
      const std::string ipath = (dir / "model.safetensors.index.json").string();
      std::ifstream in(ipath);
      json j = json::parse(in, nullptr, false);
      if (j.is_discarded() || !j.is_object()) throw InputError(ipath + ": not valid JSON");
      if (!j.contains("weight_map") || !j["weight_map"].is_object())
        throw InputError(ipath + ": missing or malformed field 'weight_map'");
      std::map<std::string, size_t> file_ids;
      std::vector<std::pair<std::string, std::string>> entries;
      for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
        if (!it->is_string()) throw InputError(ipath + ": weight_map['" + it.key() + "'] is not a string");
        const std::string f = it->get<std::string>();
        if (f.empty() || f.find('/') != std::string::npos || f.find("..") != std::string::npos)
          throw InputError(ipath + ": weight_map['" + it.key() + "'] names an invalid shard file '" + f + "'");
        if (!file_ids.count(f)) {
          file_ids[f] = shard_paths.size();
          shard_paths.push_back((dir / f).string());
        }
        entries.emplace_back(it.key(), f);
      }
      for (const auto& p : shard_paths) files_.push_back(std::make_unique<SafeTensorsFile>(p));
      for (const auto& [name, f] : entries) {
        const auto& file = *files_[file_ids[f]];
        if (!file.has(name)) throw InputError(file.path() + ": missing tensor '" + name + "' listed in " + ipath);
        index_[name] = &file.get(name);
      }
      return;
    } else if (fs::exists(dir / "model.safetensors")) {
      shard_paths.push_back((dir / "model.safetensors").string());
    } else {
      throw InputError(path + ": no model.safetensors or model.safetensors.index.json");
    }
  } else {
    throw InputError(path + ": no such file or directory");
  }
  for (const auto& p : shard_paths) files_.push_back(std::make_unique<SafeTensorsFile>(p));
  for (const auto& f : files_)
    for (const auto& [name, t] : f->tensors()) index_[name] = &t;
}

bool TensorStore::has(const std::string& name) const { return index_.count(name) != 0; }

const TensorView& TensorStore::get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end())
    throw InputError((files_.empty() ? std::string("checkpoint") : files_[0]->path()) + ": missing tensor '" +
                     name + "'");
  return *it->second;
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> v;
  for (const auto& [k, _] : index_) v.push_back(k);
  return v;
}

// ---- writing --------------------------------------------------------------------------------------------------

OwnedTensor make_f32_tensor(const std::vector<int64_t>& shape, const float* data) {
  return make_tensor(DType::F32, shape, data);
}

OwnedTensor make_tensor(DType dtype, const std::vector<int64_t>& shape, const float* data) {
  OwnedTensor t;
  t.dtype = dtype;
  t.shape = shape;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  t.bytes.resize(size_t(n) * dtype_size(dtype));
  uint8_t* p = t.bytes.data();
  switch (dtype) {
    case DType::F32: std::memcpy(p, data, size_t(n) * 4); break;
    case DType::BF16: narrow_all<uint16_t>(data, n, p, f32_to_bf16); break;
    case DType::F16: narrow_all<uint16_t>(data, n, p, f32_to_f16); break;
    default: throw std::invalid_argument(std::string("make_tensor: cannot write dtype ") + dtype_name(dtype));
  }
  return t;
}

void write_safetensors(const std::string& path, const std::map<std::string, OwnedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json hdr = json::object();
  if (!metadata.empty()) hdr["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& [name, t] : tensors) {
    hdr[name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  std::string h = hdr.dump();
  h.append((8 - (8 + h.size()) % 8) % 8, ' ');
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());  // concurrent writers (MPI ranks) never share one
  std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error(tmp + ": cannot open for writing");
  const uint64_t n = h.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(h.data(), std::streamsize(h.size()));
  for (const auto& [name, t] : tensors) out.write(reinterpret_cast<const char*>(t.bytes.data()), std::streamsize(t.bytes.size()));
  commit_temp_file(out, tmp, path, tmp);
}

}  // namespace moedit
