"""Producing text: decoding settings, the decode loop and its events."""
