"""Generated stubs of the Thermoscope wire contract (see telemetry.proto)."""
