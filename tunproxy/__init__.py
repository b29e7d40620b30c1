"""tunproxy: a transparent proxy for Linux built on a userspace TCP/IP stack."""

__version__ = "0.1.0"
