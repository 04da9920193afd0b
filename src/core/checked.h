// core/checked.h: integer arithmetic on sizes read from files and configs, with overflow checks.
//
// Every size that comes from outside (a shard header, a config field, a JSON value) is combined
// with these instead of bare * and +, so a hostile or corrupted value becomes a loom::Error that
// names the quantity instead of a wrapped number that later indexes out of bounds.
//   checked_mul(a, b, "what") / checked_add(a, b, "what"): the exact result, or throws
//   loom::Error "<what>: <a> * <b> overflows <type>". T is any integer type.
#pragma once

#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>

#include "core/error.h"

namespace loom {

template <typename T>
  requires std::is_integral_v<T>
T checked_mul(T a, T b, std::string_view what) {
  T r{};
  LOOM_CHECK(!__builtin_mul_overflow(a, b, &r), "{}: {} * {} overflows (limit {})", what, a, b,
             std::numeric_limits<T>::max());
  return r;
}

template <typename T>
  requires std::is_integral_v<T>
T checked_add(T a, T b, std::string_view what) {
  T r{};
  LOOM_CHECK(!__builtin_add_overflow(a, b, &r), "{}: {} + {} overflows (limit {})", what, a, b,
             std::numeric_limits<T>::max());
  return r;
}

}  // namespace loom
