"""Thermoscope collector."""
