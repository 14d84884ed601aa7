# syntax=docker/dockerfile:1
#
# One image for the services and the tools an operator runs beside them
# (producer, consumer, record, replay, digest, latest, doctor);
# docker-compose.yml picks the binary with `command:` and configures
# it through CRYPTOPULSE_* environment variables.
#
#   docker build -t cryptopulse .

# ---- build -------------------------------------------------------------------
# The toolchain the project is developed and tested with; Cargo.lock pins the rest.
FROM rust:1.95.0-bookworm AS build

# rocksdb (bindgen: libclang) and librdkafka (cmake, make, OpenSSL, zlib) are
# compiled from source by their crates.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libclang-dev cmake build-essential pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# The registry and target caches survive between builds (BuildKit), so a code
# change does not rebuild rocksdb and librdkafka. The binaries are copied out
# because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins --no-default-features \
    && mkdir -p /out \
    && cp target/release/producer target/release/consumer target/release/record \
          target/release/replay target/release/digest target/release/latest target/release/doctor /out/

# ---- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: the producer's wss:// connection to Binance. The rest are
# the shared libraries the binaries link (OpenSSL, zlib, the C++ runtime of
# rocksdb); librdkafka, rocksdb, lz4 and zstd are linked in statically.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g libstdc++6 \
    && rm -rf /var/lib/apt/lists/*

# Non-root. /var/lib/cryptopulse is where the consumer keeps its RocksDB
# checkpoint; it exists and is owned by the user so that a named volume mounted
# there starts out writable.
RUN groupadd --system --gid 10001 cryptopulse \
    && useradd --system --uid 10001 --gid cryptopulse --home-dir /app --shell /usr/sbin/nologin cryptopulse \
    && mkdir -p /var/lib/cryptopulse \
    && chown cryptopulse:cryptopulse /var/lib/cryptopulse

COPY --from=build /out/ /usr/local/bin/
# Recorded trades, for `replay /app/fixtures/*.parquet`.
COPY fixtures/ /app/fixtures/

WORKDIR /app
USER cryptopulse:cryptopulse
# Two malloc arenas instead of glibc's eight per core: the consumer's
# threads (librdkafka's, tokio's, RocksDB's) otherwise each keep freed
# memory in their own arena (benches/HISTORY.md, item 15: peak RSS 137-142
# -> 114-119 MiB over 10M trades at 10,000 symbols on 2 cores, for 4 % more
# CPU; glibc allows more arenas, and keeps more, on more cores).
ENV CRYPTOPULSE_STATE_DIR=/var/lib/cryptopulse/consumer \
    MALLOC_ARENA_MAX=2 \
    RUST_LOG=info

CMD ["consumer"]
