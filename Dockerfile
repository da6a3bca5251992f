# The seqserve server with the bundled BasicMotions model.
#   docker build -t seqserve . && docker run -p 50051:50051 seqserve
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos protos
COPY server server
COPY client client
RUN pip install --no-cache-dir '.[server]'
COPY models models

RUN useradd --create-home --uid 10001 seqserve
USER seqserve
ENV SEQSERVE_HOST=0.0.0.0 \
    SEQSERVE_PORT=50051 \
    SEQSERVE_MODEL_DIR=/app/models \
    TF_CPP_MIN_LOG_LEVEL=2
EXPOSE 50051
CMD ["seqserve-server"]
