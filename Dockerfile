ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The image of every mmnotify process: `mmn host` (the default command) and
# `mmn node --kind kvm|gru|xpmem`; see docker-compose.yml and the README.
#
# Two ways to build it, one Dockerfile:
#   * with a registry:  docker build -t mmnotify .
#       base python:3.11-slim, the project and its dependencies from PyPI;
#   * air-gapped:       scripts/build-images.sh
#       base mmnotify-base:bookworm (debootstrap + docker import), and a wheels/
#       directory in the build context with the dependencies and the build
#       backend: pip runs with --no-index --find-links wheels/, nothing is
#       downloaded.
# Either way the project itself is built from the source in the context, so
# the image never holds an older build of it.
# The base needs python3 with venv (Debian: python3-venv); Debian's python3
# refuses system-wide pip, so the project lives in a venv, /opt/mmn.

ENV PATH=/opt/mmn/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

COPY . /src

RUN set -eu; \
    python3 -m venv /opt/mmn; \
    if ls /src/wheels/*.whl >/dev/null 2>&1; then \
        echo "wheels/ in the build context: installing with --no-index from it"; \
        /opt/mmn/bin/pip install --no-index --find-links /src/wheels /src; \
    else \
        echo "no wheels/ in the build context: installing from the package index"; \
        /opt/mmn/bin/pip install /src; \
    fi; \
    rm -rf /src; \
    /opt/mmn/bin/mmn --help >/dev/null; \
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mmn; \
    install -d -o mmn -g mmn -m 0700 /keys /node-keys

# CURVE keys: docker-compose.yml's one-shot `keygen` service writes
# `mmn keygen /keys` into a named volume (and the nodes' share, the host's
# public key and the node keys, into /node-keys).  A new, empty named volume
# takes the owner and mode of the image's directory, so these two belong to
# mmn: the keys are written, and read, as mmn.

# Containers: listen on every interface of the container (CURVE keys from
# $MMN_KEYS_DIR guard the ports; without them, publish ports with care: plain
# TCP has no authentication); an unnamed node is called KIND-HOSTNAME, unique
# per container and stable across restarts.
ENV MMN_BIND=0.0.0.0 \
    MMN_NAME_FROM_HOSTNAME=1

USER mmn
WORKDIR /tmp
EXPOSE 7781 7782 7783
ENTRYPOINT ["mmn"]
CMD ["host"]
