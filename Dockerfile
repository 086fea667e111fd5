# fdp, as the Helm chart's default image (ghcr.io/fdp/fdp) runs it.
# Build: docker build -t ghcr.io/fdp/fdp:0.1.0 .

FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/fdp
COPY pyproject.toml README.md ./
COPY proxy proxy
COPY upstreams upstreams
COPY cache cache
COPY workers workers
COPY policies policies
RUN /opt/fdp/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/fdp/bin/pip install --no-cache-dir .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="fdp" \
      org.opencontainers.image.description="Federated Data Proxy" \
      org.opencontainers.image.ref.name="ghcr.io/fdp/fdp" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 fdp \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin fdp
COPY --from=build /opt/fdp /opt/fdp
ENV PATH=/opt/fdp/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    FDP_CONFIG=/etc/fdp/config.yaml
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["fdp"]
CMD ["serve"]
