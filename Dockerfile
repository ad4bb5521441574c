# One image for every role of docker-compose.yml: relay (overlay-relay), NAT
# routers (python -m overlay.lab.router, nftables) and nodes (overlay).
FROM python:3.11-slim-bookworm

# iproute2/nftables/conntrack for the routers and the nodes' routes,
# wireguard-tools so `wg show` can read a node, ping and iperf3 to try the tunnel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        iproute2 nftables conntrack iputils-ping iperf3 procps wireguard-tools \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml ./
COPY overlay ./overlay
COPY relay_server ./relay_server
RUN pip install --no-cache-dir . && rm -rf /src/build

WORKDIR /
CMD ["overlay", "--help"]
