// fnvsum: prints the 64-bit FNV-1a hash of each word in its arguments or on stdin.

#include <cstring>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "examples/fnv.h"
#include "examples/words.h"
#include "examples/usage.h"

int main(int argc, char** argv) {
  std::vector<std::string> words;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "-h") == 0 || std::strcmp(argv[i], "--help") == 0) {
      std::cout << kUsage;
      return 0;
    }
    words.push_back(argv[i]);
  }
  if (argc == 1) {
    std::string input((std::istreambuf_iterator<char>(std::cin)),
                      std::istreambuf_iterator<char>());
    words = textutil::SplitWords(input);
  }
  for (const std::string& word : words) {
    std::cout << textutil::ToHex(textutil::Fnv1a64(word)) << "  " << word << "\n";
  }
  return 0;
}
