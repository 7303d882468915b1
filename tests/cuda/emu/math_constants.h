// Host EMULATION (tests/cuda/emu/run.sh).
#pragma once
#include <cmath>
#define CUDART_INF_F INFINITY
