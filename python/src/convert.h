// Conversions between moedit's C++ values and Python objects: JSON → dict/list, matrices → NumPy arrays.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "kernels/ops.h"
#include "model/hooks.h"

namespace moedit::py {

namespace nb = nanobind;
using Array = nb::ndarray<nb::numpy, float, nb::ndim<2>, nb::c_contig>;      // [rows, cols] float32
using View = nb::ndarray<nb::numpy, float, nb::ndim<2>>;                     // strided, no owner

// The JSON value as Python objects (what json.loads of the CLI's --json output gives; non-finite numbers → None,
// as nlohmann's dump() prints them null).
nb::object to_python(const nlohmann::json& j);
// A float32 array [rows, cols] that owns `m` (moved in, not copied).
Array owned_array(MatR&& m);
// A float32 array [rows, cols] over a capture's rows: the capture is kept alive by the array (no copy).
Array capture_array(std::shared_ptr<Hooks::Capture> cap, int cols);
// A writable view of a hook's activation, valid only while the hook runs (no owner, no copy).
nb::object hook_view(Eigen::Ref<MatR> act);

}  // namespace moedit::py
