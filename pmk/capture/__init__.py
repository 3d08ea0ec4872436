"""Packet sources: each backend brings packets in and carries verdicts out."""
