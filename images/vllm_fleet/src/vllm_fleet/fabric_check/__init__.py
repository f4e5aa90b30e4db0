"""Fabric check: the RFC's Launcher / Coordinator / Communicator, made real (docs/plugin.md)."""
