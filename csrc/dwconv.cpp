#include "common.h"

namespace mbnet {

void bind_dwconv(py::module_& m) {}

}  // namespace mbnet
