# mednode image: one image for the listener/web (`mednode serve`) and the Celery worker
# (`mednode worker`); docker-compose.yml runs both from it.
FROM python:3.11-slim

# PyPI's torch wheels for Linux pull the CUDA runtime (several GB). For CPU-only hosts pass a
# CPU wheel index: docker build --build-arg TORCH_INDEX_URL=<cpu wheel index> .
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MEDNODE_DATA_DIR=/var/lib/mednode \
    MEDNODE_DICOM_HOST=0.0.0.0 \
    MEDNODE_DICOM_PORT=11112 \
    MEDNODE_WEB_HOST=0.0.0.0 \
    MEDNODE_WEB_PORT=8080 \
    TCP_NODELAY=1

WORKDIR /app

# Dependencies first, so code edits do not reinstall torch: install the declared requirements
# from setup.cfg against an empty package, then the real code.
COPY setup.cfg pyproject.toml constraints.txt README.md ./
RUN mkdir -p dicom_io storage inference node \
    && touch dicom_io/__init__.py storage/__init__.py inference/__init__.py node/__init__.py \
    && pip install -c constraints.txt ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} . \
    && pip uninstall -y mednode

COPY dicom_io ./dicom_io
COPY storage ./storage
COPY inference ./inference
COPY node ./node
RUN pip install -c constraints.txt --no-deps . \
    && groupadd --system mednode \
    && useradd --system --gid mednode --home-dir /var/lib/mednode --create-home mednode \
    && mkdir -p /var/lib/mednode && chown mednode:mednode /var/lib/mednode

USER mednode
VOLUME ["/var/lib/mednode"]
EXPOSE 11112 8080

# Liveness: the DICOM port accepts a TCP connection (works for `serve`; the worker service
# overrides it in docker-compose.yml).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ['MEDNODE_DICOM_PORT'])), 3).close()"

ENTRYPOINT ["mednode"]
CMD ["serve"]
