# syntax=docker/dockerfile:1
# The seckill engine image: `docker build -t seckill .` (docker-compose.yml builds it as well).
# The image holds only the engine; PostgreSQL runs in its own containers.

# --- build -----------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and the build folder between builds; the binary is
# copied out of the cached target folder in the same step, since the cache is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin seckill \
    && install -m 0755 target/release/seckill /usr/local/bin/seckill

# --- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid/gid, so orchestrators can check that the container does not run as root.
RUN groupadd --system --gid 10001 seckill \
    && useradd --system --uid 10001 --gid seckill --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin seckill
COPY --from=builder /usr/local/bin/seckill /usr/local/bin/seckill
USER 10001:10001
# The HTTP API; set `[server] listen = "0.0.0.0:8080"` in shards.toml (the default listens on
# 127.0.0.1 only, which is unreachable from outside the container).
EXPOSE 8080
ENTRYPOINT ["seckill"]
CMD ["serve", "--config", "/etc/seckill/shards.toml"]
