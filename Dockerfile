# One image for every mro-edge service (`mro-edge service NAME`, `mro-edge devices init`, ...).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# uid/gid 1883 is the `mosquitto` account of the eclipse-mosquitto image. compose runs the
# broker as the same uid, so Mosquitto reads the 0600 password/ACL files written here.
RUN groupadd --gid 1883 mro \
 && useradd --uid 1883 --gid 1883 --home-dir /data --no-create-home --shell /usr/sbin/nologin mro

WORKDIR /app
# Dependencies are pinned (==) in pyproject.toml; sources are copied before installing.
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY mro_edge ./mro_edge
RUN pip install .
COPY config ./config

# The data volume (and the broker-auth volume inside it) start owned by the service user
# with mode 0700: docker copies this ownership into a new named volume on first mount.
RUN install -d -o 1883 -g 1883 -m 0700 /data /data/broker

ENV MRO_CONFIG=/app/config/edge.toml \
    MRO_DATA_DIR=/data
USER 1883:1883
CMD ["mro-edge", "--help"]
