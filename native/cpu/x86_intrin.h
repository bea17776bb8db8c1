// <immintrin.h> for the ops' AVX-512 paths, minus GCC 12's false -W(maybe-)uninitialized inside
// avx512fintrin.h (GCC PR 105593, triggered by target attributes); the pragma is location-based.
#pragma once
#if defined(__x86_64__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
