"""Opening a TUN device (the fd is the device: closing it removes the interface)."""

from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


class TunError(OSError):
    pass


def open_tun(ifname: str, *, vnet_hdr: bool = False) -> tuple[int, str]:
    """Create TUN `ifname` in the current namespace; returns (non-blocking fd, actual name)."""
    if not ifname or len(ifname.encode()) >= IFNAMSIZ or "/" in ifname or " " in ifname:
        raise ValueError(f"bad interface name {ifname!r} (1-15 characters, no '/' or spaces)")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from None
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    try:
        ifr = struct.pack("16sH22x", ifname.encode(), flags)
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        raise TunError(exc.errno, f"cannot create TUN {ifname!r}: {exc.strerror}") from None
    name = res[:IFNAMSIZ].rstrip(b"\0").decode()
    return fd, name
