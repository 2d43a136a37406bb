#!/bin/sh
# Source from the --pack step of the device scripts, before ninja: meson before 1.4 gives nvcc no
# dependency-file flags, so ninja records no headers for CUDA objects and an edited .cuh rebuilds
# nothing (mesonbuild/meson#11969). When a kernels/ header changed since the last pack, every .cu
# is touched; the stamp is renewed after the build (cuda_fresh_done).
CUDA_STAMP=build-cuda/.cuda-headers-stamp
if [ ! -f "$CUDA_STAMP" ] ||
    [ -n "$(find kernels engine -name '*.cuh' -newer "$CUDA_STAMP" -o -name '*.h' -newer "$CUDA_STAMP" | head -1)" ]; then
    touch kernels/cuda/*.cu
fi
cuda_fresh_done() { touch "$CUDA_STAMP"; }
