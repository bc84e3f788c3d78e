# fastconn: build the wheel (Rust extension, release profile), then a slim runtime image.
FROM rust:1-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/maturin && /opt/maturin/bin/pip install --no-cache-dir "maturin>=1.7,<2"
ENV PATH="/opt/maturin/bin:${PATH}"
WORKDIR /src
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY rust ./rust
COPY python ./python
# The wheel targets the runtime image's CPython 3.11 (bookworm ships 3.11 too).
RUN maturin build --release --interpreter python3 --out /wheels

FROM python:3.11-slim-bookworm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 fastconn
USER fastconn
# The admin server (health, readiness, metrics, webhooks, callbacks) listens here.
EXPOSE 8081
ENV FASTCONN_CONFIG=/etc/fastconn/fastconn.toml
ENTRYPOINT ["python", "-m", "fastconn"]
CMD ["run"]
