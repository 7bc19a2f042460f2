#include "common.h"

namespace mbnet {

void bind_batchnorm(py::module_& m) {}

}  // namespace mbnet
