"""WireGuard protocol constants (from the WireGuard paper, section 6 and 5.4).

All times are seconds on the core's monotonic clock.
"""

from __future__ import annotations

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TAG_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE  # a keepalive

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 0.334
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
# Retransmissions of one handshake before giving up: REKEY_ATTEMPT_TIME / REKEY_TIMEOUT.
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
# An initiator refreshes its session when receiving on a keypair this old, so that
# the keys are replaced before the peer would reject them.
REKEY_ON_RECEIVE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
ZERO_KEYS_AFTER = REJECT_AFTER_TIME * 3

REPLAY_WINDOW_BITS = 8192  # WireGuard's kernel implementation uses 8192 - 64 usable bits
MAX_STAGED_PACKETS = 128
# Minimum spacing between two accepted initiations of one peer (flood guard as in WireGuard).
INITIATIONS_MIN_INTERVAL = 1.0 / 50
