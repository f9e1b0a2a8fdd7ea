# hookbridge: build in a Rust image, run in a slim Debian one, as a non-root user.
#
# Base images are build arguments, so machines without a registry can build from local
# images (scripts/docker.sh builder / base make them):
#   docker build -t hookbridge .
#   docker build -t hookbridge --build-arg RUST_IMAGE=... --build-arg RUNTIME_IMAGE=... .
ARG RUST_IMAGE=rust:1.90-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
# librdkafka is built from source: a C toolchain and the OpenSSL headers (skipped when the
# builder image has them already).
RUN if ! command -v cc >/dev/null || ! pkg-config --exists openssl 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends pkg-config libssl-dev build-essential \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
# Dependencies first, against stub sources: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin benches tests/it examples \
    && echo 'fn main() {}' > src/main.rs && echo 'fn main() {}' > src/bin/kinovi-sim.rs \
    && touch src/lib.rs && echo 'fn main() {}' > tests/it/main.rs \
    && for b in $(sed -n '/^\[\[bench\]\]/{n;s/^name = "\(.*\)"/\1/p;}' Cargo.toml); do echo 'fn main() {}' > benches/$b.rs; done \
    && for e in $(sed -n 's/^name = "\(.*_consumer\)"/\1/p' Cargo.toml); do echo 'fn main() {}' > examples/$e.rs; done \
    && cargo build --release --locked --features sim --bin hookbridge --bin kinovi-sim \
    && rm -rf src benches tests examples
# Only what the binaries are built from, so edits elsewhere (docs, tests, scripts) reuse
# this stage. The test and bench targets stay stubs: cargo wants their files to exist.
RUN mkdir -p benches tests/it examples \
    && echo 'fn main() {}' > tests/it/main.rs \
    && for b in $(sed -n '/^\[\[bench\]\]/{n;s/^name = "\(.*\)"/\1/p;}' Cargo.toml); do echo 'fn main() {}' > benches/$b.rs; done \
    && for e in $(sed -n 's/^name = "\(.*_consumer\)"/\1/p' Cargo.toml); do echo 'fn main() {}' > examples/$e.rs; done
COPY src src
COPY schema schema
# Sources may carry older timestamps than the stub build: make cargo see them as new.
# Debug info is dropped from the shipped binaries (symbols stay, for backtraces).
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --features sim --bin hookbridge --bin kinovi-sim \
    && mkdir -p /out && cp target/release/hookbridge target/release/kinovi-sim /out/ \
    && strip --strip-debug /out/hookbridge /out/kinovi-sim

FROM ${RUNTIME_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/hookbridge hookbridge \
    && mkdir -p /var/lib/hookbridge && chown hookbridge /var/lib/hookbridge
COPY --from=build /out/hookbridge /out/kinovi-sim /usr/local/bin/
COPY config /etc/hookbridge
USER hookbridge
# The outbox lives here: mount a volume so accepted events survive the container.
VOLUME /var/lib/hookbridge
ENV HOOKBRIDGE_OUTBOX__DATA_DIR=/var/lib/hookbridge \
    HOOKBRIDGE_SERVER__LISTEN=0.0.0.0:8080
EXPOSE 8080
# /healthz on the public port, with bash alone (no HTTP client in the image). Change the
# port here if HOOKBRIDGE_SERVER__LISTEN moves it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["hookbridge"]
CMD ["--config", "/etc/hookbridge/default.toml"]
