# The worker's image: `python -m chalicelib.worker` drains queue.order.check,
# queue.order.pay and queue.order.seckill into the handlers, and stops cleanly
# (exit 0) on SIGTERM. It holds the product only: requirements.txt installed into
# a venv, and chalicelib/ (no app.py, no local/, no tests/). Its settings come
# only from its environment (chalicelib/config.py). Build from the repository's root:
#
#   docker build -t shop-pay-worker .
#   docker run --env-file worker.env shop-pay-worker
#
# BASE: any Debian-like image with python3 (3.11) and its venv module, e.g.
# localhost/debian-python:bookworm made by .ci/podman.sh. Offline, from a
# wheelhouse made on the host (`pip wheel -r requirements.txt -w DIR`):
#
#   podman build --build-arg BASE=localhost/debian-python:bookworm \
#     --build-context wheels=DIR -t shop-pay-worker .
#
# The default target is the last stage, `worker`. The `dev` stage (the same
# runtime plus requirements-dev.txt, no code) is only for local/docker-compose.yml,
# which mounts the repository into it.
ARG BASE=python:3.11-slim

# The wheelhouse: empty unless the build names one (--build-context wheels=DIR).
FROM scratch AS wheels

FROM ${BASE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    STAGE=prod
WORKDIR /app
COPY requirements.txt ./
# A venv on both bases (Debian's python3 refuses pip into the system), so `python`
# is the venv's everywhere. With a wheelhouse nothing is fetched and no wheel stays
# in a layer (it is mounted, not copied); without one, the package index is used.
RUN --mount=type=bind,from=wheels,target=/tmp/wheels \
    python3 -m venv /opt/venv \
 && if ls /tmp/wheels/*.whl >/dev/null 2>&1; then \
      pip install --no-index --find-links /tmp/wheels -r requirements.txt; \
    else \
      pip install -r requirements.txt; \
    fi
# /keys: where the Alipay keys are mounted (ALIPAY_*_FILE); owned by the user so
# that a named volume made from it is writable by the dev stack's sandbox.
RUN groupadd --gid 10001 shop \
 && useradd --no-log-init --uid 10001 --gid shop --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin shop \
 && mkdir /keys && chown shop:shop /keys

# local/docker-compose.yml only: the dev tools' packages (chalice, moto, ...); the
# stack mounts the repository at /app.
FROM runtime AS dev
COPY requirements-dev.txt ./
RUN --mount=type=bind,from=wheels,target=/tmp/wheels \
    if ls /tmp/wheels/*.whl >/dev/null 2>&1; then \
      pip install --no-index --find-links /tmp/wheels -r requirements-dev.txt; \
    else \
      pip install -r requirements-dev.txt; \
    fi
USER shop:shop

FROM runtime AS worker
COPY chalicelib/ chalicelib/
USER shop:shop
# Exec form: python is PID 1 and gets the SIGTERM itself; the worker finishes the
# message in hand, acks it and exits 0.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "chalicelib.worker"]
