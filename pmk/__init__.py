"""pmk: a user-space verdict-request server for application firewalls."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
#: Every protocol version this server speaks (hello, get_version).
PROTOCOL_VERSIONS = (PROTOCOL_VERSION,)
