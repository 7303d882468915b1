// The extension module moedit._moedit: exceptions, then the classes and functions (model_py.cpp, tools_py.cpp).
#include "io/errors.h"
#include "model/memory.h"
#include "model_py.h"

NB_MODULE(_moedit, m) {
  namespace nb = nanobind;
  m.doc() = "moedit: locate and edit facts inside Mixture-of-Experts language models";
  // The CLI prints "moedit: error: <message>" (exit 2) for these; Python gets the same message.
  nb::exception<moedit::InputError>(m, "InputError", PyExc_ValueError);
  nb::exception<moedit::ResourceError>(m, "ResourceError", PyExc_MemoryError);
  nb::class_<moedit::py::PyModel> model = moedit::py::bind_model(m);
  moedit::py::bind_tools(m, model);
}
