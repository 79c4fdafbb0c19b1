# meshcert container image: both programs, built in a Rust stage, run from a minimal image.
#   docker build -t meshcert:latest .
# The agent DaemonSet adds the capabilities it needs (deploy/kubernetes/agent.yaml); the holder
# runs as the non-root user 65532.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins -p meshcert-ca -p meshcert-agent \
 && install -D -m 0755 target/release/meshcert-ca /out/usr/bin/meshcert-ca \
 && install -D -m 0755 target/release/meshcert-agent /out/usr/bin/meshcert-agent

# glibc, CA certificates and a nonroot user, nothing else (no shell, no package manager).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /
USER 65532:65532
ENTRYPOINT ["/usr/bin/meshcert-agent"]
CMD ["run", "--config", "/etc/meshcert/agent.yaml"]
