# llm-gatekeeper: multi-stage build. The runtime image holds one static-ish binary, CA
# certificates, and runs as an unprivileged user (uid 1000, as Huggingface Spaces expects).

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so that source changes do not rebuild them.
# .cargo/ holds the C defaults of the allocator (mimalloc), built with the dependencies, and the
# profile-guided optimisation of x86_64 builds (config.toml, the rustc wrapper it names, the
# profile in pgo/): the dependencies are compiled with the profile too.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY . .
# Make sure the real sources are newer than the cached dummy build.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
    && strip target/release/llm-gatekeeper

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --create-home --home-dir /app gatekeeper \
    && mkdir -p /app/data && chown gatekeeper:gatekeeper /app/data
COPY --from=build /src/target/release/llm-gatekeeper /usr/local/bin/llm-gatekeeper
USER gatekeeper
WORKDIR /app
# Users live here with GATEKEEPER_STORE=sqlite (SQLITE_PATH defaults to data/users.sqlite).
VOLUME ["/app/data"]
ENV PORT=7860 \
    BIND_ADDRESS=0.0.0.0
EXPOSE 7860
STOPSIGNAL SIGTERM
CMD ["llm-gatekeeper"]
