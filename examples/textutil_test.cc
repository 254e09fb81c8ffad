// Tests for //examples:textutil. Exits non-zero if any check fails.

#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

#include "examples/fnv.h"
#include "examples/words.h"

namespace {

int failures = 0;

template <typename T>
void ExpectEq(const T& actual, const T& expected, const char* what) {
  if (!(actual == expected)) {
    ++failures;
    std::cerr << "FAIL: " << what << "\n";
  }
}

void TestFnv() {
  // Reference values from the FNV specification's test suite.
  ExpectEq<uint64_t>(textutil::Fnv1a64(""), 0xcbf29ce484222325ULL, "fnv1a64(\"\")");
  ExpectEq<uint64_t>(textutil::Fnv1a64("a"), 0xaf63dc4c8601ec8cULL, "fnv1a64(\"a\")");
  ExpectEq<uint64_t>(textutil::Fnv1a64("foobar"), 0x85944171f73967e8ULL, "fnv1a64(\"foobar\")");
}

void TestToHex() {
  ExpectEq<std::string>(textutil::ToHex(0), "0000000000000000", "ToHex(0)");
  ExpectEq<std::string>(textutil::ToHex(0xcbf29ce484222325ULL), "cbf29ce484222325",
                        "ToHex(offset basis)");
}

void TestStrings() {
  ExpectEq<std::string>(textutil::Trim("  hello \t\n"), "hello", "Trim");
  ExpectEq<std::string>(textutil::Trim(" \t "), "", "Trim of blanks");
  const std::vector<std::string> words = textutil::SplitWords("  one two\tthree\n");
  ExpectEq<std::vector<std::string>::size_type>(words.size(), 3, "SplitWords count");
  ExpectEq<std::string>(textutil::Join(words, ","), "one,two,three", "Join");
  ExpectEq<std::string>(textutil::Join({}, ","), "", "Join of nothing");
}

}  // namespace

int main() {
  TestFnv();
  TestToHex();
  TestStrings();
  if (failures > 0) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "all checks passed\n";
  return 0;
}
