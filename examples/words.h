#ifndef EXAMPLES_WORDS_H_
#define EXAMPLES_WORDS_H_

#include <string>
#include <vector>

namespace textutil {

// `text` without leading and trailing ASCII whitespace.
std::string Trim(const std::string& text);

// The whitespace-separated words of `text`, in order; never contains empty strings.
std::vector<std::string> SplitWords(const std::string& text);

// `parts` joined with `separator` between each pair.
std::string Join(const std::vector<std::string>& parts, const std::string& separator);

}  // namespace textutil

#endif  // EXAMPLES_WORDS_H_
