# The otakit update server: `otakit serve` on 0.0.0.0:8080, its data (SQLite database and
# blobs) in the volume /data, as an unprivileged user. docs/install.md says how to run it.
#
#   docker build -t otakit .
#   docker run -d --name otakit -p 8080:8080 -v otakit-data:/data otakit
#   docker logs otakit | grep otk_        # the admin token, printed once on the first start
#
# With PostgreSQL and S3: append `--database-url postgresql://... --blob-url s3://...` to the
# `docker run` line (the arguments replace CMD's, so give --data/--host/--port again).

FROM python:3.12-slim AS build
# detools (delta updates) builds a C extension
RUN apt-get update && apt-get install -y --no-install-recommends gcc && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[server]'

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin otakit \
    && mkdir /data && chown otakit:otakit /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'otakit[server]' && rm -rf /wheels
USER otakit
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
ENV PYTHONUNBUFFERED=1
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=8).status != 200)"]
ENTRYPOINT ["otakit"]
CMD ["serve", "--data", "/data", "--host", "0.0.0.0", "--port", "8080"]
