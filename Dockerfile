# The seqserve server with the bundled BasicMotions model.
#   docker build -t seqserve .
#   docker run --rm -p 50051:50051 -p 9090:9090 seqserve
#   docker stop -t 30 ...   (drain 5 s, grace 5 s, then the snapshot: more
#                            than docker's default 10 s before it kills)
# Stage 1 builds the wheel; stage 2 installs it with the server's dependencies,
# so the image holds no sources or build tools.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY server server
COPY client client
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --find-links /wheels 'seqserve[server]' \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 seqserve
WORKDIR /app
COPY models models
USER 10001
ENV SEQSERVE_HOST=0.0.0.0 \
    SEQSERVE_PORT=50051 \
    SEQSERVE_METRICS_PORT=9090 \
    SEQSERVE_MODEL_DIR=/app/models \
    SEQSERVE_LOG_FORMAT=json \
    TF_CPP_MIN_LOG_LEVEL=2
EXPOSE 50051 9090
# Models load and warm up before the health service reports SERVING.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["seqserve-healthcheck", "--address=127.0.0.1:50051"]
CMD ["seqserve-server"]
