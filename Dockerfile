# The DearMP image: every service in docker-compose.yml runs a `dearmp` command from it.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY workers ./workers
COPY schemas ./schemas
COPY config ./config
RUN pip install --no-cache-dir . && useradd --system --uid 10001 dearmp
USER dearmp
CMD ["dearmp", "worker"]
