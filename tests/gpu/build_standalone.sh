#!/bin/sh
# Build the GPU test and benchmark without meson (the GPU machine has no jansson, so the
# top-level meson configure cannot run there). Usage: tests/gpu/build_standalone.sh OUTDIR
# Compiles kernels/cuda/*.cu (sm_90a) + kernels/cpu/*.c; links test_moe_gpu, test_nvfp4_cpu,
# bench_moe_gpu. Needs nvcc and gcc with OpenMP.
set -e
O=${1:-build-gpu/sa}
mkdir -p "$O/obj"
NVFLAGS="-gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -lineinfo -I. $EXTRA"
CFLAGS="-std=c11 -O3 -Wall -Wextra -Wno-unused-parameter -D_GNU_SOURCE -fopenmp -I. -I/usr/local/cuda/include"
for f in runtime moe_route moe_nvfp4 moe_gemm_ws; do
    nvcc $NVFLAGS -c kernels/cuda/$f.cu -o "$O/obj/$f.o" &
done
for f in kernels/cpu/*.c; do
    gcc $CFLAGS -c "$f" -o "$O/obj/cpu_$(basename "$f" .c).o" &
done
wait
OBJS="$O/obj/runtime.o $O/obj/moe_route.o $O/obj/moe_nvfp4.o $O/obj/moe_gemm_ws.o $O/obj/cpu_*.o"
LIBS="-L/usr/local/cuda/lib64 -lcudart_static -ldl -lrt -lpthread -lm -lstdc++ -fopenmp"
gcc $CFLAGS tests/gpu/test_moe_gpu.c $OBJS $LIBS -o "$O/test_moe_gpu"
gcc $CFLAGS tests/gpu/test_nvfp4_cpu.c $O/obj/cpu_*.o -lm -fopenmp -o "$O/test_nvfp4_cpu"
if [ -f tests/gpu/bench_moe_gpu.c ]; then
    gcc $CFLAGS tests/gpu/bench_moe_gpu.c $OBJS $LIBS -lcublas -o "$O/bench_moe_gpu"
fi
echo "built in $O"
