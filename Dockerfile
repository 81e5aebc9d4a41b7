# Multi-stage build: the static musl binary, then an image with only that binary, CA
# roots and the example config.
#   docker build -t azure-openai-proxy .
#   docker run -p 3010:3010 --env-file ./proxy.env azure-openai-proxy
# The configuration is read from /app/config, where the Python proxy's image had it,
# so its users' `-v /path/to/config:/app/config` works unchanged. A relative
# logging.file is taken from /app (the config directory's parent): the Python
# example's `../logs/app.log` is /logs/app.log, writable here (mount a volume on /logs
# to keep it).
FROM rust:1-bookworm AS build
# musl-tools: ring's C code for the musl target; python3 + curl: build-static.sh's
# check that the static binary resolves names.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools python3 curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN scripts/build-static.sh \
 && mkdir -p /out/app/config /out/logs \
 && cp target/x86_64-unknown-linux-musl/release/azure-openai-proxy /out/azure-openai-proxy \
 && cp config/base.yaml config/production.yaml /out/app/config/

FROM scratch
# TLS to Azure is verified against the roots built into the binary (webpki-roots);
# the system bundle is here for anything that looks for it.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/azure-openai-proxy /azure-openai-proxy
COPY --from=build /out/app /app
COPY --from=build --chown=65534:65534 /out/logs /logs
WORKDIR /app
ENV ENVIRONMENT=production
EXPOSE 3010
# nobody:nogroup; the image has no /etc/passwd, so numeric ids.
USER 65534:65534
# No --config-dir: the default, `config` in the working directory, is /app/config, and
# arguments given to `docker run` (--env-only, say) are not at odds with one.
ENTRYPOINT ["/azure-openai-proxy"]
