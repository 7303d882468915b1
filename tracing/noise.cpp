// Noise for causal tracing: numpy's legacy RandomState (bit for bit), --noise rules, drawn, loaded and saved noise,
// and the embedding std that scales it.
#include "tracing/trace.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <stdexcept>

#include "io/errors.h"
#include "io/safetensors.h"

namespace moedit::trace {

NumpyRandomState::NumpyRandomState(uint32_t seed) {
  // init_genrand (numpy's legacy mt19937_seed)
  mt_[0] = seed;
  for (int i = 1; i < 624; ++i) mt_[i] = 1812433253u * (mt_[i - 1] ^ (mt_[i - 1] >> 30)) + uint32_t(i);
  idx_ = 624;
}

uint32_t NumpyRandomState::next32() {
  if (idx_ >= 624) {
    for (int i = 0; i < 624; ++i) {
      const uint32_t y = (mt_[i] & 0x80000000u) | (mt_[(i + 1) % 624] & 0x7fffffffu);
      mt_[i] = mt_[(i + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    idx_ = 0;
  }
  uint32_t y = mt_[idx_++];
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return y;
}

double NumpyRandomState::next_double() {
  const uint32_t a = next32() >> 5, b = next32() >> 6;
  return (double(a) * 67108864.0 + double(b)) / 9007199254740992.0;
}

double NumpyRandomState::gauss() {
  if (has_gauss_) {
    has_gauss_ = false;
    return gauss_;
  }
  double x1, x2, r2;
  do {
    x1 = 2.0 * next_double() - 1.0;
    x2 = 2.0 * next_double() - 1.0;
    // Rounded separately (volatile): a fused multiply-add here would change which pairs are rejected/accepted
    // and the digits, and numpy computes x1*x1 + x2*x2 without contraction.
    const volatile double a2 = x1 * x1;
    const volatile double b2 = x2 * x2;
    r2 = a2 + b2;
  } while (r2 >= 1.0 || r2 == 0.0);
  const double f = std::sqrt(-2.0 * std::log(r2) / r2);
  gauss_ = f * x1;
  has_gauss_ = true;
  return f * x2;
}

NoiseRule parse_noise_rule(const std::string& s) {
  NoiseRule r;
  r.text = s;
  auto number = [&](const std::string& t) {
    try {
      size_t used = 0;
      const double v = std::stod(t, &used);
      if (used != t.size() || !std::isfinite(v) || v < 0) throw std::invalid_argument(t);
      return v;
    } catch (const std::exception&) {
      throw InputError("--noise: '" + s + "' is not a noise rule (s<F>, u<F> or a non-negative σ, e.g. s3, u0.5, 0.1)");
    }
  };
  if (s.empty()) throw InputError("--noise: empty noise rule");
  if (s[0] == 's') {
    r.type = NoiseRule::ScaledStd;
    r.value = s.size() > 1 ? number(s.substr(1)) : 1.0;
  } else if (s[0] == 'u') {
    r.type = NoiseRule::Uniform;
    r.value = number(s.substr(1));
  } else {
    r.type = NoiseRule::Fixed;
    r.value = number(s);
  }
  return r;
}

Noise make_noise(const NoiseRule& rule, double embedding_std, int samples, int len, int hidden, uint32_t seed) {
  if (samples < 1) throw InputError("--samples must be at least 1");
  NumpyRandomState rs(seed);
  const double scale = rule.type == NoiseRule::ScaledStd ? rule.value * embedding_std : rule.value;
  Noise n(size_t(samples), MatR(len, hidden));
  for (int s = 0; s < samples; ++s)
    for (int i = 0; i < len; ++i)
      for (int h = 0; h < hidden; ++h) {
        const double u = rule.type == NoiseRule::Uniform ? rs.uniform(-1.0, 1.0) : rs.gauss();
        n[size_t(s)](i, h) = float(scale * u);
      }
  return n;
}

Noise load_noise_file(const std::string& path, int len, int hidden) {
  SafeTensorsFile f(path);
  if (!f.has("noise")) throw InputError(path + ": no tensor named 'noise' (expected [samples, subject_len, hidden])");
  const TensorView& t = f.get("noise");
  if (t.shape.size() != 3 || t.shape[0] < 1 || t.shape[1] != len || t.shape[2] != hidden)
    throw InputError(path + ": tensor 'noise' must have shape [samples, " + std::to_string(len) + ", " +
                     std::to_string(hidden) + "] (subject length, hidden size)");
  const std::vector<float> v = t.to_f32();
  Noise n(size_t(t.shape[0]), MatR(len, hidden));
  for (size_t s = 0; s < n.size(); ++s)
    std::copy(v.begin() + std::ptrdiff_t(s * size_t(len) * size_t(hidden)),
              v.begin() + std::ptrdiff_t((s + 1) * size_t(len) * size_t(hidden)), n[s].data());
  return n;
}

void save_noise_file(const std::string& path, const Noise& noise, const std::map<std::string, std::string>& metadata) {
  if (noise.empty()) throw InputError("no noise to save");
  const int len = int(noise[0].rows()), H = int(noise[0].cols());
  std::vector<float> all;
  for (const MatR& m : noise) all.insert(all.end(), m.data(), m.data() + m.size());
  write_safetensors(path, {{"noise", make_f32_tensor({int64_t(noise.size()), len, H}, all.data())}}, metadata);
}

double embedding_std(const Model& m, const std::vector<std::vector<int32_t>>& token_lists) {
  const Weight& E = m.weights().embed;
  double sum = 0, sq = 0;
  int64_t n = 0;
  for (const auto& l : token_lists)
    for (int32_t id : l) {
      if (id < 0 || id >= E.rows()) throw InputError("token id " + std::to_string(id) + " is outside the vocabulary");
      for (int h = 0; h < E.cols(); ++h) {
        const double x = E(id, h);
        sum += x;
        sq += x * x;
      }
      n += E.cols();
    }
  if (n < 2) throw InputError("cannot compute the embedding std: fewer than 2 values");
  const double mean = sum / double(n);
  return std::sqrt(std::max(0.0, (sq - double(n) * mean * mean) / double(n - 1)));
}

}  // namespace moedit::trace
