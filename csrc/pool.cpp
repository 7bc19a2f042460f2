#include "common.h"

namespace mbnet {

void bind_pool(py::module_& m) {}

}  // namespace mbnet
