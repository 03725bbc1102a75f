"""Exposition: /metrics, what it says (each job read at scrape time), its HTTP server and passwords."""
