# ivon-diag: API, worker and migrations in one image (CPU torch).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY requirements/constraints.txt requirements/constraints.txt
# The CPU wheel: the default index would pull a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY app app
COPY ivon_core ivon_core
COPY sensitivity sensitivity
COPY worker worker
COPY migrations migrations
COPY ivon_diag ivon_diag
RUN pip install -c requirements/constraints.txt ".[cleanlab]" && useradd --create-home ivon && mkdir -p /data && chown ivon /data
USER ivon
EXPOSE 8000
CMD ["ivon-diag", "serve", "--host", "0.0.0.0", "--port", "8000"]
