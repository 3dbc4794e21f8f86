# One image for every mro-edge service (`mro-edge service NAME`, `mro-edge devices init`, ...).
# The base image is pinned to an exact tag (Python 3.11.13, Debian 12 bookworm) in both stages;
# Python packages come pinned from constraints.txt, the lock `make install` uses too.

# Build: a wheel of the project, with the default config and registries inside as package data.
FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY mro_edge ./mro_edge
COPY config ./config
RUN pip install -c constraints.txt --upgrade pip \
 && pip wheel --no-deps --wheel-dir /wheels .

# Run: the wheel and its locked dependencies installed into site-packages; no source tree.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# uid/gid 1883 is the `mosquitto` account of the eclipse-mosquitto image. compose runs the
# broker as the same uid, so Mosquitto reads the 0600 password/ACL files written here.
RUN groupadd --gid 1883 mro \
 && useradd --uid 1883 --gid 1883 --home-dir /data --no-create-home --shell /usr/sbin/nologin mro

COPY constraints.txt /tmp/constraints.txt
COPY --from=build /wheels /tmp/wheels
RUN pip install -c /tmp/constraints.txt --upgrade pip \
 && pip install -c /tmp/constraints.txt /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels /tmp/constraints.txt

# The data volume (and the broker-auth, tls, hop-key and secret-<service> volumes inside it)
# start owned by the service user with mode 0700: docker copies this ownership into a new named
# volume on first mount (compose.yaml mounts each service's password directory and each stage's
# hop key directory into its container alone).
RUN install -d -o 1883 -g 1883 -m 0700 /data /data/broker /data/tls /data/secrets /data/hopkeys \
 && for s in ingest validate sign uplink heartbeat supervisor operator health mcc; do \
      install -d -o 1883 -g 1883 -m 0700 "/data/secrets/$s"; done \
 && install -d -o 1883 -g 1883 -m 0700 /data/hopkeys/ingest /data/hopkeys/validate /data/hopkeys/sign \
      /data/hopkeys/uplink

# The configuration is the packaged default (config/edge.toml in the repository); MRO_CONFIG
# points at another file, MRO_<SECTION>_<KEY> overrides one setting.
ENV MRO_DATA_DIR=/data
WORKDIR /data
USER 1883:1883
CMD ["mro-edge", "--help"]
