# hookbridge: build in a Rust image, run in a slim Debian one.
FROM rust:1.90-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends pkg-config libssl-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --features sim --bin hookbridge --bin kinovi-sim

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/hookbridge hookbridge \
    && mkdir -p /var/lib/hookbridge && chown hookbridge /var/lib/hookbridge
COPY --from=build /src/target/release/hookbridge /src/target/release/kinovi-sim /usr/local/bin/
COPY config /etc/hookbridge
USER hookbridge
# The outbox lives here: mount a volume so accepted events survive the container.
VOLUME /var/lib/hookbridge
ENV HOOKBRIDGE_OUTBOX__DATA_DIR=/var/lib/hookbridge \
    HOOKBRIDGE_SERVER__LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["hookbridge"]
CMD ["--config", "/etc/hookbridge/default.toml"]
