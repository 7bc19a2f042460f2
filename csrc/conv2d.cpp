#include "common.h"

namespace mbnet {

void bind_conv2d(py::module_& m) {}

}  // namespace mbnet
