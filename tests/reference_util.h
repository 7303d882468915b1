// Reading the PyTorch references that tools/rome_reference.py and tools/memit_reference.py write
// (tests/fixtures/edit/*.safetensors): metadata, id sequences, id-level edit requests, the key-statistics corpus,
// float32 logits and float64 values; and the relative error the cross-checks compare logits with.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "editor/rome.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "test_util.h"

namespace moedit::edit_test {

class Reference {
 public:
  explicit Reference(const std::string& fixture_rel) : file_(test::fixture(fixture_rel)) {}

  const std::string& meta(const std::string& key) const { return file_.metadata().at(key); }
  int meta_int(const std::string& key) const { return std::stoi(meta(key)); }
  double meta_double(const std::string& key) const { return std::stod(meta(key)); }  // Python repr: exact
  bool has(const std::string& name) const { return file_.has(name); }
  const TensorView& get(const std::string& name) const { return file_.get(name); }

  // Any tensor as float64 values, row-major (F64 read as stored, the other dtypes through fp32).
  std::vector<double> values(const std::string& name) const {
    const TensorView& t = file_.get(name);
    std::vector<double> v(size_t(t.numel()));
    if (t.dtype == DType::F64) {
      std::memcpy(v.data(), t.data, t.nbytes);
    } else {
      const std::vector<float> f = t.to_f32();
      std::copy(f.begin(), f.end(), v.begin());
    }
    return v;
  }
  // An int64 tensor as ids (exact below 2^24, as every id and count here is).
  std::vector<int32_t> ids(const std::string& name) const {
    const std::vector<float> f = file_.get(name).to_f32();
    return {f.begin(), f.end()};
  }
  // A 2-D id tensor [n, len] as n sequences (the key-statistics corpus).
  std::vector<std::vector<int32_t>> rows(const std::string& name) const {
    const TensorView& t = file_.get(name);
    const std::vector<int32_t> all = ids(name);
    std::vector<std::vector<int32_t>> out;
    for (int64_t r = 0; r < t.shape[0]; ++r) out.emplace_back(all.begin() + r * t.shape[1], all.begin() + (r + 1) * t.shape[1]);
    return out;
  }
  // The id-level request stored under `prefix` (rome_reference.request_tensors): {prefix}prompts.{i} (bare prompt
  // first), subject_last, kl_prompt, kl_subject_last [1], target.
  EditIds edit_ids(const std::string& prefix = "") const {
    EditIds e;
    for (int i = 0; has(prefix + "prompts." + std::to_string(i)); ++i)
      e.prompts.push_back(ids(prefix + "prompts." + std::to_string(i)));
    e.subject_last = ids(prefix + "subject_last");
    e.kl_prompt = ids(prefix + "kl_prompt");
    e.kl_subject_last = ids(prefix + "kl_subject_last")[0];
    e.target = ids(prefix + "target");
    return e;
  }
  // A float tensor [rows, cols] (logits [positions, vocab]) as fp32.
  MatR matrix(const std::string& name, int64_t rows, int64_t cols) const {
    MatR x(rows, cols);
    const TensorView& t = file_.get(name);
    if (t.numel() != rows * cols) ADD_FAILURE() << name << ": " << t.numel() << " values, expected " << rows * cols;
    else t.to_f32(x.data());
    return x;
  }

 private:
  SafeTensorsFile file_;
};

// max |got − want| / max |want| of two logit matrices [positions, vocab].
inline double logits_rel_err(const MatR& got, const MatR& want) {
  if (got.rows() != want.rows() || got.cols() != want.cols()) return 1e300;
  return double((got - want).cwiseAbs().maxCoeff() / want.cwiseAbs().maxCoeff());
}

}  // namespace moedit::edit_test
