# syntax=docker/dockerfile:1
#
# docker build --build-arg VERSION=$(git describe --always) -t slipway .
# docker run -p 5000:5000 -v slipway-data:/var/lib/slipway slipway

FROM golang:1.26 AS build
WORKDIR /src
# Modules first, so a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -buildvcs=false \
        -ldflags "-s -w -X main.version=${VERSION}" \
        -o /out/slipway ./cmd/slipway \
    && mkdir -p /out/data

# Static binary on distroless: CA certificates (for HTTPS upstreams), a
# passwd entry for nonroot (65532), no shell.
FROM gcr.io/distroless/static-debian13:nonroot
COPY --from=build /out/slipway /usr/local/bin/slipway
# The data directory belongs to nonroot; a new named volume mounted here
# copies that ownership.
COPY --from=build --chown=65532:65532 /out/data /var/lib/slipway
USER 65532:65532
VOLUME /var/lib/slipway
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/slipway"]
CMD ["serve", "--listen", ":5000", "--data-dir", "/var/lib/slipway"]
