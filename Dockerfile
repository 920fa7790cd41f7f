# syntax=docker/dockerfile:1
# The pgbranch image: one binary (`pgbranch operator`, `pgbranch storage
# serve`, `pgbranch crd`) on the official PostgreSQL image, so the storage
# engine has initdb, pg_controldata and postgres of the major version the
# computes run. Build one image per PostgreSQL major:
#   docker build -t pgbranch/pgbranch:0.1.0 .
#   docker build --build-arg PG_MAJOR=16 -t pgbranch/pgbranch:0.1.0-pg16 .
# The toolchain CI builds with (Cargo.toml's rust-version is the minimum).
ARG RUST_VERSION=1.95
ARG PG_MAJOR=15

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pgbranch \
 && install -m 0755 target/release/pgbranch /usr/local/bin/pgbranch

# Same Debian release as the builder: the binary links the same glibc.
FROM postgres:${PG_MAJOR}-bookworm
# initdb, postgres and pg_controldata are on the base image's PATH
# (/usr/lib/postgresql/<major>/bin).
COPY --from=build /usr/local/bin/pgbranch /usr/local/bin/pgbranch
# The postgres user (uid 999) of the base image: initdb and postgres refuse
# to run as root. The chart runs the operator as 65532 and the storage
# service as 999.
USER 999:999
ENTRYPOINT ["pgbranch"]
CMD ["--help"]
