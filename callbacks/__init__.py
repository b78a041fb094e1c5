"""Lightning callbacks of ablab: GPU telemetry of a test run, and arms taking turns on one device."""

from callbacks.gpu_telemetry import GPUTelemetry
from callbacks.lockstep import Lockstep, LockstepServer, LockstepTimeout

__all__ = ["GPUTelemetry", "Lockstep", "LockstepServer", "LockstepTimeout"]
