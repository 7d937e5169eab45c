// The worker pool moved to util/ (the image layer uses it too, for decompression); this name
// stays for the writers that include it from here.
#pragma once

#include "util/worker_pool.hpp"
