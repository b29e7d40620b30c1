"""Packet capture: the pcapng codec (sans-I/O), TUN frames, and the file writer."""
