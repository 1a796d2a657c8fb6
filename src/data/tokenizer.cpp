// The byte-level tokenizer and Megatron's vocabulary padding (data.h).
#include <limits>

#include "moecore/data.h"
#include "moecore/error.h"

namespace moe {

std::vector<int64_t> ByteTokenizer::encode(const std::string& text) const {
  std::vector<int64_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string s;
  s.reserve(ids.size());
  for (int64_t id : ids)
    if (id >= 0 && id <= 255) s.push_back(static_cast<char>(static_cast<unsigned char>(id)));
  return s;
}

int64_t padded_vocab_size(int64_t vocab, int64_t divisible_by, int64_t tp) {
  MOE_CHECK(vocab > 0, "padded_vocab_size: vocab must be > 0, got ", vocab);
  MOE_CHECK(divisible_by > 0 && tp > 0, "padded_vocab_size: make_vocab_size_divisible_by (", divisible_by,
            ") and tensor_model_parallel_size (", tp, ") must be > 0");
  MOE_CHECK(divisible_by <= std::numeric_limits<int64_t>::max() / tp, "padded_vocab_size: ", divisible_by, " · ", tp,
            " overflows");
  const int64_t multiple = divisible_by * tp;
  MOE_CHECK(vocab <= std::numeric_limits<int64_t>::max() - multiple, "padded_vocab_size: vocab ", vocab, " too large");
  return (vocab + multiple - 1) / multiple * multiple;
}

}  // namespace moe
