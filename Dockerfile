# fastconn: build the wheel (Rust extension, release profile), then a slim runtime image.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends curl build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH="/root/.cargo/bin:${PATH}"
RUN pip install --no-cache-dir "maturin>=1.7,<2"
WORKDIR /src
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY rust ./rust
COPY python ./python
RUN maturin build --release --out /wheels

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
