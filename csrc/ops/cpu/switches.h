// On/off switches of the CPU kernel's own paths, read from the environment per call.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace resnet_fused {
namespace ops {

// True when the variable ``name`` is "0"; unset or "1" is on; anything else is an error
// naming the variable and what came.
inline bool switched_off(const char* name) {
  const char* value = std::getenv(name);
  const std::string setting = value ? value : "";
  TORCH_CHECK(setting.empty() || setting == "0" || setting == "1", name,
              " should be 0 (off) or 1 (on, the default), got '", setting, "'");
  return setting == "0";
}

}  // namespace ops
}  // namespace resnet_fused
