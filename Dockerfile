FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY protocol protocol
COPY realtime realtime
COPY channels channels
COPY storage storage
COPY alerts alerts
COPY presence presence
COPY crypto crypto
COPY moderation moderation
COPY client client
COPY loadtests loadtests
RUN pip install --no-cache-dir . && useradd --system --uid 10001 realtime
# RT_DATA_DIR (the SQLite store, the development outbox of pushes and SMS sent while no
# provider is configured): the server's account alone, 0700, as the server itself makes it
# (README, Deployment: data at rest). Made before VOLUME: a new volume starts as this copy.
ENV RT_DATA_DIR=/app/data
RUN install -d -o realtime -m 0700 /app/data
VOLUME ["/app/data"]
USER realtime
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz').status == 200 else 1)"
STOPSIGNAL SIGTERM
CMD ["realtime", "serve", "--host", "0.0.0.0", "--port", "8000"]
