#ifndef EXAMPLES_FNV_H_
#define EXAMPLES_FNV_H_

#include <cstdint>
#include <string>

namespace textutil {

// The 64-bit FNV-1a hash of `data`.
uint64_t Fnv1a64(const std::string& data);

// `value` as 16 lowercase hex digits.
std::string ToHex(uint64_t value);

}  // namespace textutil

#endif  // EXAMPLES_FNV_H_
