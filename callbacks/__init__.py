"""Lightning callbacks of ablab: GPU telemetry of a test run, and arms taking turns on one device.

Loaded on first use: the launcher imports callbacks/turns.py (the lockstep server) without Lightning.
"""

_WHERE = {"GPUTelemetry": "gpu_telemetry", "Lockstep": "lockstep", "LockstepServer": "turns",
          "LockstepTimeout": "turns"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"callbacks.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'callbacks' has no attribute {name!r}")


__all__ = ["GPUTelemetry", "Lockstep", "LockstepServer", "LockstepTimeout"]
