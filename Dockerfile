# Images for the operator and the node agent.
#   docker build --target operator -t ghcr.io/regmirror/regmirror:0.1.0 .
#   docker build --target agent    -t ghcr.io/regmirror/regmirror-agent:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p regmirror -p regmirror-node-agent

# Both binaries link glibc only (TLS is rustls): distroless "cc" is enough.
# USER and WORKDIR are stated even where the base image has them: testbed/images/build packs
# the same images without Docker, and testbed/tests/images.rs compares them with this file.
FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /src/target/release/regmirror /usr/local/bin/regmirror
USER 65532:65532
WORKDIR /home/nonroot
ENTRYPOINT ["/usr/local/bin/regmirror"]
CMD ["controller"]

# The agent runs as root (the chart says so): it writes root-owned host files and asks systemd
# for restarts over the host's D-Bus socket. It needs `sh` only for a configured restart command.
FROM debian:bookworm-slim AS agent
COPY --from=build /src/target/release/regmirror-agent /usr/local/bin/regmirror-agent
USER 0:0
WORKDIR /
ENTRYPOINT ["/usr/local/bin/regmirror-agent"]
CMD ["run"]
