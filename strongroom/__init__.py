"""Strongroom: keep proprietary code and ML models secret on edge devices.

This package is the shared kernel: the error root, the wire and file formats that several roles
share (artifact container, enclave image, fleet policy), small crypto compositions, and the CLI.
Formats here are pure: they take bytes or open streams and return objects or raise.
"""

__version__ = "0.1.0"
