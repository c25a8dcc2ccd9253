# The relay as a container: the wheel installed into a slim Python, run as a non-root user.
#   docker build -t relay .
#   docker compose up            (compose.yaml: migrate, web, worker, PostgreSQL, Redis)

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 relay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER relay
WORKDIR /home/relay
ENV PORT=8000 \
    WEB_CONCURRENCY=2 \
    GUNICORN_THREADS=16 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
# The web process; the same image runs `relay worker` and `relay db upgrade`.
CMD ["sh", "-c", "exec relay serve --host 0.0.0.0 --port \"$PORT\" --workers \"$WEB_CONCURRENCY\" --threads \"$GUNICORN_THREADS\""]
