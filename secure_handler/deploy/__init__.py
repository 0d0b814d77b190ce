"""Deployment: hardened config, config audit, and the one TorchServe launcher (serve/stop)."""
