#include "common.h"

namespace mbnet {

void bind_loss(py::module_& m) {}

}  // namespace mbnet
