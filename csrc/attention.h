// One attention call (AttentionArgs in common.h): split into (batch, head, query range) tasks on the
// thread pool, each run by the active ISA tree's kernel.
#pragma once
#include "common.h"

namespace sp {

// Must be called without the GIL.
void run_attention(const AttentionArgs& a, int n_threads);

}  // namespace sp
