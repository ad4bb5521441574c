"""I/O shells for the agent: TUN device, UDP sockets (GSO/GRO), virtio-net
offload helpers and rtnetlink configuration."""
