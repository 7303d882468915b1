// See convert.h.
#include "convert.h"

#include <cmath>

namespace moedit::py {

nb::object to_python(const nlohmann::json& j) {
  using T = nlohmann::json::value_t;
  switch (j.type()) {
    case T::null: return nb::none();
    case T::boolean: return nb::bool_(j.get<bool>());
    case T::number_integer: return nb::int_(j.get<int64_t>());
    case T::number_unsigned: return nb::int_(j.get<uint64_t>());
    case T::number_float: {
      const double v = j.get<double>();
      return std::isfinite(v) ? nb::object(nb::float_(v)) : nb::none();
    }
    case T::string: return nb::str(j.get_ref<const std::string&>().c_str());
    case T::array: {
      nb::list out;
      for (const auto& x : j) out.append(to_python(x));
      return out;
    }
    case T::object: {
      nb::dict out;
      for (const auto& [k, v] : j.items()) out[nb::str(k.c_str())] = to_python(v);
      return out;
    }
    default: throw std::runtime_error("JSON value of an unsupported type (binary)");
  }
}

Array owned_array(MatR&& m) {
  auto* p = new MatR(std::move(m));
  nb::capsule owner(p, [](void* q) noexcept { delete static_cast<MatR*>(q); });
  return Array(p->data(), {size_t(p->rows()), size_t(p->cols())}, owner);
}

Array capture_array(std::shared_ptr<Hooks::Capture> cap, int cols) {
  const size_t rows = size_t(cap->value.rows());
  if (rows == 0) cols = int(cap->value.cols()) ? int(cap->value.cols()) : cols;  // never called: [0, cols]
  auto* p = new std::shared_ptr<Hooks::Capture>(std::move(cap));
  nb::capsule owner(p, [](void* q) noexcept { delete static_cast<std::shared_ptr<Hooks::Capture>*>(q); });
  return Array((*p)->value.data(), {rows, size_t(cols)}, owner);
}

nb::object hook_view(Eigen::Ref<MatR> act) {
  View v(act.data(), {size_t(act.rows()), size_t(act.cols())}, nb::handle(), {int64_t(act.outerStride()), 1});
  return nb::cast(v, nb::rv_policy::reference);
}

}  // namespace moedit::py
